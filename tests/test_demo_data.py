"""The demo's rendered scenes, their stage texts and the files `evip demo-data` writes."""
from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from evip.demo import tasks
from evip.demo.make_data import DemoDataConfig, build_demo_data, scene_seed
from evip.demo.scenes import BACKGROUND, COLOURS, CONCEPT, SHAPES, SIMPLE, SLOTS, WORD_COLOUR, box_to_1000, render_scene


def test_render_is_deterministic_and_seeds_differ():
    a, fa = render_scene(7)
    b, fb = render_scene(7)
    assert a.tobytes() == b.tobytes() and fa == fb
    others = [render_scene(s)[0].tobytes() for s in range(8, 14)]
    assert a.tobytes() not in others


@pytest.mark.parametrize("size", [56, 112])
def test_facts_match_pixels(size):
    for seed in range(120):
        image, scene = render_scene(seed, size)
        px = np.asarray(image)
        assert 1 <= len(scene.objects) <= 4
        assert len({o.position for o in scene.objects} | ({scene.word.position} if scene.word else set())) \
            == len(scene.objects) + (scene.word is not None)
        for o in scene.objects:
            assert o.shape in SHAPES and o.colour in COLOURS and o.position in SLOTS
            cx, cy = o.center
            assert tuple(px[cy, cx]) == COLOURS[o.colour], (seed, o)
            x1, y1, x2, y2 = o.box
            assert 0 <= x1 < cx < x2 <= size and 0 <= y1 < cy < y2 <= size
            # the shape's colour appears only inside its box
            mask = np.all(px == COLOURS[o.colour], axis=-1)
            ys, xs = np.nonzero(mask)
            others = [p for p in scene.objects if p.colour == o.colour and p is not o]
            if not others:
                assert xs.min() >= x1 and xs.max() <= x2 and ys.min() >= y1 and ys.max() <= y2
        if scene.word:
            x1, y1, x2, y2 = scene.word.box
            assert 0 <= x1 < x2 <= size and 0 <= y1 < y2 <= size
            assert all(x2 <= a[0] or a[2] <= x1 or y2 <= a[1] or a[3] <= y1
                       for a in (o.box for o in scene.objects)), (seed, scene)
            inside = px[y1:y2, x1:x2].reshape(-1, 3)
            ink = inside.astype(int).mean(-1) < (sum(WORD_COLOUR) / 3 + 2 * BACKGROUND[0]) / 3
            assert ink.sum() >= 5 and np.ptp(inside.astype(int), axis=-1).max() < 10  # grey ink
        # the corners are background
        assert tuple(px[0, 0]) == BACKGROUND and tuple(px[-1, -1]) == BACKGROUND


def test_grounding_boxes_are_in_0_1000_and_contain_the_object():
    for seed in range(40):
        _, scene = render_scene(seed, 112)
        for o in scene.objects:
            ans = tasks.grounding_answer(o, scene.size)
            m = re.fullmatch(r"<ref>(\w+ \w+)</ref><box>\[\[(\d+), (\d+), (\d+), (\d+)\]\]</box>", ans)
            assert m and m.group(1) == o.name
            x1, y1, x2, y2 = map(int, m.groups()[1:])
            assert 0 <= x1 < x2 <= 1000 and 0 <= y1 < y2 <= 1000
            cx, cy = (c * 1000 / scene.size for c in o.center)
            assert x1 <= cx <= x2 and y1 <= cy <= y2
    assert box_to_1000((0, 0, 112, 112), 112) == [0, 0, 1000, 1000]


def test_stage_texts():
    counts = {"grounding": 0, "counting": 0, "ocr": 0}
    for seed in range(200):
        _, scene = render_scene(seed)
        rng = random.Random(seed)
        dense = tasks.dense_caption(scene)
        for o in scene.objects:
            assert f"{o.name} {tasks.WHERE[o.position]}" in dense
        assert tasks.noisy_alt_text(scene, rng).strip()
        task, q, a = tasks.task_sample(scene, rng)
        counts[task] += 1
        if task == "ocr":
            assert a == scene.word.text
        if task == "counting":
            shape = re.match(r"How many (\w+?)s? are", q).group(1)
            assert int(a) == (len(scene.objects) if shape == "shape" else scene.count(shape=shape))
        turns = tasks.chat(scene, rng)
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert turns[0]["value"].startswith("<image>\n")
        assert sum(t["value"].count("<image>") for t in turns) == 1
        q = tasks.heldout_question(scene, rng)
        truth = {"colour": lambda: next(o.colour for o in scene.objects
                                        if f"{o.shape} {tasks.WHERE[o.position]}?" in q["question"]),
                 "count": lambda: str(len(scene.objects)),
                 "word": lambda: scene.word.text,
                 "position": lambda: next(o.position for o in scene.objects if o.name in q["question"])}
        assert q["options"][q["answer"]] == truth[q["kind"]]()
    assert all(n > 10 for n in counts.values()), counts


def test_noisy_captions_are_noisy_and_dense_ones_exact():
    _, scene = render_scene(3)
    noisy = {tasks.noisy_alt_text(scene, random.Random(i)) for i in range(30)}
    assert len(noisy) > 10
    assert tasks.dense_caption(scene) == tasks.dense_caption(render_scene(3)[1])


def test_build_writes_readable_shards_chats_and_heldout(tmp_path):
    cfg = DemoDataConfig(n_s1_1=30, n_s1_2=12, n_s1_3=10, n_s2=8, n_heldout=9, samples_per_shard=10)
    m = build_demo_data(tmp_path, cfg)
    assert len(m["shards"]["s1_1"]) == 3 and len(m["shards"]["s1_2"]) == 2
    samples = list(wds.WebDataset([str(tmp_path / p) for p in m["shards"]["s1_1"]], shardshuffle=False))
    assert len(samples) == 30 and len({s["__key__"] for s in samples}) == 30
    first = samples[0]
    meta = json.loads(first["json"])
    assert first["txt"].decode() == meta["caption"]
    image = Image.open(__import__("io").BytesIO(first["png"]))
    assert image.size == (112, 112)
    assert image.tobytes() == render_scene(scene_seed(0, "s1_1", 0), 112, SIMPLE)[0].tobytes()   # S1.1: simple pictures
    for name in ("s1_3/tasks.jsonl", "s2/chats.jsonl"):
        lines = (tmp_path / name).read_text().splitlines()
        assert len(lines) in (cfg.n_s1_3, cfg.n_s2)
        for line in lines:
            rec = json.loads(line)
            assert (tmp_path / name).parent.joinpath(rec["image"]).is_file()
            assert rec["conversations"][0]["from"] == "human"
            assert rec["conversations"][0]["value"].startswith("<image>\n")
    probes = json.loads((tmp_path / "heldout/probes.json").read_text())
    assert [p["kind"] for p in probes] == ["colour", "shape"] * 9 and all(p["form"] == "caption" for p in probes)
    qs = json.loads((tmp_path / "heldout/questions.json").read_text())
    assert len(qs) == 9 and all(0 <= q["answer"] < len(q["options"]) for q in qs)
    assert all((tmp_path / "heldout" / q["image"]).is_file() for q in qs)
    # held-out scenes are not training scenes
    train = {s["png"] for s in samples}
    assert not any((tmp_path / "heldout" / q["image"]).read_bytes() in train for q in qs)


def test_cli_demo_data(tmp_path):
    from evip.cli import main
    assert main(["demo-data", str(tmp_path), "--n-s1-1", "5", "--n-s1-2", "5", "--n-s1-3", "5",
                 "--n-s2", "5", "--n-heldout", "5"]) == 0
    assert json.loads((tmp_path / "manifest.json").read_text())["counts"]["s1_1"] == 5


def test_heldout_question_kinds_do_not_follow_the_scene_layout():
    """Texts draw from their own stream (tasks.text_rng), not the one that drew the scene: drawn
    from Random(scene seed), the question kind followed the scene's draws (52 of 100 held-out
    questions were counts). Each kind (3 or 4 possible per scene) now takes a fair share, and
    every kind is asked of scenes with 1 to 4 shapes."""
    from collections import Counter, defaultdict
    kinds, sizes = Counter(), defaultdict(set)
    for i in range(400):
        s = scene_seed(0, "heldout", i)
        _, scene = render_scene(s)
        q = tasks.heldout_question(scene, tasks.text_rng(s))
        kinds[q["kind"]] += 1
        sizes[q["kind"]].add(len(scene.objects))
    for kind in ("colour", "position", "count"):
        assert 0.2 <= kinds[kind] / 400 <= 0.4, kinds
        assert sizes[kind] == {1, 2, 3, 4}, (kind, sizes[kind])
    assert 0.05 <= kinds["word"] / 400 <= 0.3, kinds


def test_concept_pictures_are_simple_and_large():
    """S1.1's style: one large shape in the centre or two side by side, no words; facts match pixels."""
    n = {1: 0, 2: 0}
    for seed in range(200):
        image, scene = render_scene(seed, 112, CONCEPT)
        px = np.asarray(image)
        n[len(scene.objects)] += 1
        assert scene.word is None
        if len(scene.objects) == 1:
            assert scene.objects[0].position == "centre"
        for o in scene.objects:
            assert tuple(px[o.center[1], o.center[0]]) == COLOURS[o.colour]
            x1, y1, x2, y2 = o.box
            assert (x2 - x1) >= 0.3 * 112                       # large: at least 30% of the side
        assert tuple(px[0, 0]) == BACKGROUND
    assert n[1] > 60 and n[2] > 60, n


def test_simple_pictures_are_mostly_one_shape_in_the_centre():
    """S1.1's style: CONCEPT's layouts, three in four of them a lone centred shape."""
    lone = 0
    for seed in range(400):
        _, scene = render_scene(seed, 112, SIMPLE)
        assert len(scene.objects) in (1, 2) and scene.word is None
        lone += len(scene.objects) == 1
        if len(scene.objects) == 1:
            assert scene.objects[0].position == "centre"
        else:
            assert {o.position for o in scene.objects} == {"left", "right"}
    assert 0.68 * 400 < lone < 0.82 * 400, lone


def test_concept_alt_text_names_its_objects_with_light_noise():
    names, tags = 0, 0
    for seed in range(300):
        _, scene = render_scene(seed, 112, CONCEPT)
        text = tasks.noisy_alt_text(scene, random.Random(seed), tasks.CONCEPT_NOISE)
        names += all(o.name in text.lower() for o in scene.objects)
        tags += any(t in text.lower() for t in tasks.JUNK_TAGS)
    assert names > 0.8 * 300 and 0.2 * 300 < tags < 0.8 * 300, (names, tags)


def test_caption_probes_change_one_attribute():
    for seed in range(50):
        _, scene = render_scene(seed)
        probes = tasks.caption_probes(scene, random.Random(seed))
        for p, values in zip(probes, (list(COLOURS), list(SHAPES))):
            assert len(p["options"]) == len(values) == len(set(p["options"]))
            assert p["options"][p["answer"]] == tasks.dense_caption(scene)       # the truth is among them
            assert p["object"] in p["options"][p["answer"]]
