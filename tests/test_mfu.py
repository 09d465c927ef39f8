"""MFU and step metrics: the FLOPs of a packed step against a hand count, GPU peaks by model name,
and a peak-memory counter that is the step's own (reset after each logged step)."""
from __future__ import annotations

import json

import pytest
import torch

from evip.metrics import Metrics, attended_pairs, peak_flops, step_flops


def test_flops_of_a_packed_row_match_a_hand_count(tiny_cfg):
    # two rows: samples of 3 and 2 tokens (+1 pad), one sample of 4 (+2 pad)
    seq_ids = torch.tensor([[0, 0, 0, 1, 1, -1], [0, 0, 0, 0, -1, -1]])
    assert attended_pairs(seq_ids).item() == 3 * 3 + 2 * 2 + 4 * 4          # not 2 rows x 6^2
    # tiny_cfg: H=64, F=128, L=2, 4 heads / 2 KV heads of 16, V=128
    per_layer = (64 * 64 + 2 * 64 * 32 + 64 * 64) + 3 * 64 * 128 + 2 * 64     # attention, ONE FFN, 2 norms
    body = 2 * per_layer + 64                                                  # + final norm
    tokens, labelled, pairs = 9, 5, 29
    hand = 6 * body * tokens + 6 * 64 * 128 * labelled + 12 * 2 * (4 * 16) * pairs
    assert hand == 4_288_896
    assert step_flops(tiny_cfg, tokens, labelled, pairs) == hand


def test_gpu_peaks_by_model_name():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12          # SXM
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA H100 NVL") == 835e12
    assert peak_flops("NVIDIA H200") == 989e12 and peak_flops("NVIDIA A100-SXM4-80GB") == 312e12


def test_mfu_and_peak_memory_are_per_step(tmp_path, tiny_cfg, monkeypatch):
    peaks = iter([10 * 2**30, 3 * 2**30])                # the second step's own peak is lower
    resets = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 PCIe")
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: next(peaks))
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda *a: 0)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: resets.append(1))
    m = Metrics(tmp_path, 0, tiny_cfg)
    counters = type("C", (), {"step": 1, "tokens": 9, "skipped": 0})()
    stats = {"tokens": 9, "samples": 3, "labelled": 5, "pairs": 29.0, "loss": 1.0, "grad_norm": 1.0,
             "kind_loss": {}}
    for _ in range(2):
        m.log_step("s", counters, stats, 1e-3, 1e-6, 0.0, 10, False)
    m.close()
    recs = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["mem_alloc_gb"] for r in recs] == [10.0, 3.0] and len(resets) == 2
    assert recs[0]["step_flops"] == 4_288_896
    assert recs[0]["mfu"] == pytest.approx(4_288_896 / 1e-6 / 756e12)
