"""`evip.evals.other_images`: the held-out "other image" control swaps whole images of equal size."""
from __future__ import annotations

import torch

from evip.evals import other_images

IMG, START, END, TPT = 99, 97, 98, 2          # <IMG_CONTEXT>, <img>, </img>, tokens per tile


def image_tokens(tiles: int) -> list[int]:
    return [START, *[IMG] * (tiles * TPT), END]


def test_images_of_equal_size_rotate_and_a_lone_size_keeps_its_own():
    # row 0: image A (1 tile), text, image B (2 tiles); row 1: images C and D (1 tile each)
    row0 = [5, *image_tokens(1), 6, *image_tokens(2), 7]
    row1 = [*image_tokens(1), *image_tokens(1), 8]
    width = max(len(row0), len(row1))
    ids = torch.tensor([row0 + [0] * (width - len(row0)), row1 + [0] * (width - len(row1))])
    tiles = torch.arange(5).view(5, 1, 1, 1).expand(5, 3, 4, 4).clone()   # tile k is filled with k
    # tile order: A=0, B=1,2, C=3, D=4
    out = other_images({"input_ids": ids, "pixel_values": tiles}, TPT, IMG)
    assert [int(t[0, 0, 0]) for t in out] == [3, 1, 2, 4, 0]     # A<-C, B keeps, C<-D, D<-A
    assert torch.equal(tiles[:, 0, 0, 0], torch.arange(5))       # input untouched


def test_adjacent_images_are_separate_runs():
    ids = torch.tensor([[*image_tokens(1), *image_tokens(1)]])
    tiles = torch.stack([torch.zeros(3, 4, 4), torch.ones(3, 4, 4)])
    out = other_images({"input_ids": ids, "pixel_values": tiles}, TPT, IMG)
    assert torch.equal(out[0], tiles[1]) and torch.equal(out[1], tiles[0])
