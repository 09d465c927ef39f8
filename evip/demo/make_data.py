"""Write the demo's data: the formats a real EViP run reads, filled with rendered scenes.

Layout under OUT_DIR (every path below is what the demo recipes in `demo/recipes/` point at):

    s1_1/shard-00000.tar ...     img2dataset layout: {key}.png, {key}.txt (noisy alt-text), {key}.json;
                                 simple pictures (three in four a lone large shape: scenes.SIMPLE)
    s1_2/shard-00000.tar ...     same layout, exact dense captions (positions, counts)
    s1_3/shard-00000.tar ...     same layout, dense captions (the captioning task)
    s1_3/tasks.jsonl + images/   LLaVA-format single-turn task chats: grounding, counting, OCR
    s2/chats.jsonl + images/     LLaVA-format multi-turn chats
    heldout/questions.json + images/   multiple-choice questions with the right option's index
    heldout/probes.json          caption probes: the colour / shape of one object, options = captions
    manifest.json                counts, shards and the config that made them

Scene seeds are disjoint per split (`scene_seed`), so no held-out picture is a training picture.
The curriculum is coarse to fine, as the paper's: S1.1 reads noisy alt-text of mostly lone shapes,
S1.2 exact dense captions, S1.3 tasks, S2 chats, these of one or two large shapes
(`rich=1`: S1.2 onwards in the RICH style, which ten CPU minutes do not learn to see).
"""
from __future__ import annotations

import io
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import webdataset as wds

from evip.demo import tasks
from evip.demo.scenes import CONCEPT, RICH, SIMPLE, SceneStyle, render_scene

SPLITS = ("s1_1", "s1_2", "s1_3", "s2", "heldout")
# The demo's world is one or two large shapes in every split (CONCEPT): what a 16-token, 112 px
# patch embedding learns to see in ten CPU minutes. RICH scenes (up to four small shapes and a
# word; `rich=1`) are not learned in that budget: measured, S1.2 on them took S1.1's colour
# accuracy from 53% to chance.
# S1.1 concept learning sees mostly lone shapes (SIMPLE), the coarse end of the curriculum.
STYLE_OF: dict[str, SceneStyle] = {split: CONCEPT for split in SPLITS} | {"s1_1": SIMPLE}
RICH_SPLITS = ("s1_2", "s1_3", "s2", "heldout")     # the splits `rich=1` renders in the RICH style
ALT_TEXT_NOISE = {"s1_1": tasks.CONCEPT_NOISE}      # a split's alt-text noise (default tasks.WEB_NOISE)


def scene(seed: int, split: str, size: int, rich: bool = False):
    """The rendered picture and facts of one scene of `split`, in that split's style."""
    return render_scene(seed, size, RICH if rich and split in RICH_SPLITS else STYLE_OF[split])


@dataclass
class DemoDataConfig:
    seed: int = 0
    image_size: int = 112          # rendered side in pixels (the model tiles/resizes it)
    n_s1_1: int = 3200
    n_s1_2: int = 1600
    n_s1_3: int = 1000             # task chats; as many captioning samples again in tar shards
    n_s2: int = 600
    n_heldout: int = 200
    samples_per_shard: int = 250
    rich: int = 0                  # 1: S1.2 onwards (and the held-out set) in the RICH style


def scene_seed(seed: int, split: str, index: int) -> int:
    """The scene seed of sample `index` of `split`: disjoint ranges per split and per seed."""
    return (seed * len(SPLITS) + SPLITS.index(split)) * 10_000_000 + index


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False, compress_level=1)
    return buf.getvalue()


def _write_shards(out: Path, samples, per_shard: int) -> list[str]:
    """Write (key, png, txt, meta) tuples to tar shards of `per_shard` samples."""
    out.mkdir(parents=True, exist_ok=True)
    names, writer, n = [], None, 0
    for key, png, txt, meta in samples:
        if writer is None or n == per_shard:
            if writer is not None:
                writer.close()
            name = f"shard-{len(names):05d}.tar"
            names.append(name)
            writer, n = wds.TarWriter(str(out / name)), 0
        writer.write({"__key__": key, "png": png, "txt": txt, "json": meta})
        n += 1
    if writer is not None:
        writer.close()
    return names


def _caption_samples(cfg: DemoDataConfig, split: str, n: int, exact: bool):
    for i in range(n):
        s = scene_seed(cfg.seed, split, i)
        image, facts = scene(s, split, cfg.image_size, bool(cfg.rich))
        rng = tasks.text_rng(s)
        noise = ALT_TEXT_NOISE.get(split, tasks.WEB_NOISE)
        txt = tasks.dense_caption(facts) if exact else tasks.noisy_alt_text(facts, rng, noise)
        meta = {"key": f"{split}_{i:07d}", "caption": txt, "width": cfg.image_size,
                "height": cfg.image_size, "scene": facts.to_dict()}
        yield meta["key"], _png(image), txt, meta


def _write_chats(out: Path, split: str, cfg: DemoDataConfig, n: int, offset: int,
                 make_turns) -> str:
    """Write a LLaVA-format jsonl plus its images folder; returns the jsonl file name."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    name = "tasks.jsonl" if split == "s1_3" else "chats.jsonl"
    with open(out / name, "w") as f:
        for i in range(offset, offset + n):
            s = scene_seed(cfg.seed, split, i)
            image, facts = scene(s, split, cfg.image_size, bool(cfg.rich))
            key = f"{split}_{i:07d}"
            image.save(out / "images" / f"{key}.png", compress_level=1)
            record = {"id": key, "image": f"images/{key}.png",
                      "conversations": make_turns(facts, tasks.text_rng(s))}
            f.write(json.dumps(record) + "\n")
    return name


def _task_turns(scene, rng, n: int = 2):
    """Up to n different tasks about one image (its tokens then serve several answers)."""
    return tasks.conversation(tasks.task_sample(scene, rng)[1:] for _ in range(n))


def _write_heldout(out: Path, cfg: DemoDataConfig) -> None:
    (out / "images").mkdir(parents=True, exist_ok=True)
    questions, probes = [], []
    for i in range(cfg.n_heldout):
        s = scene_seed(cfg.seed, "heldout", i)
        image, facts = scene(s, "heldout", cfg.image_size, bool(cfg.rich))
        key = f"heldout_{i:07d}"
        image.save(out / "images" / f"{key}.png", compress_level=1)
        rng = tasks.text_rng(s)
        q = tasks.heldout_question(facts, rng)
        questions.append({"id": key, "image": f"images/{key}.png", **q})
        probes += [{"id": f"{key}_{p['kind']}", "image": f"images/{key}.png", **p}
                   for p in tasks.caption_probes(facts, rng)]
    (out / "questions.json").write_text(json.dumps(questions, indent=1))
    (out / "probes.json").write_text(json.dumps(probes, indent=1))


def build_demo_data(out_dir: str | Path, cfg: DemoDataConfig | None = None) -> dict:
    """Write every split under `out_dir`; return (and save as manifest.json) what was written."""
    cfg = cfg or DemoDataConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    shards = {
        "s1_1": _write_shards(out / "s1_1", _caption_samples(cfg, "s1_1", cfg.n_s1_1, exact=False),
                              cfg.samples_per_shard),
        "s1_2": _write_shards(out / "s1_2", _caption_samples(cfg, "s1_2", cfg.n_s1_2, exact=True),
                              cfg.samples_per_shard),
        # S1.3 captioning: indices [0, n) in shards; its task chats use indices [n, 2n).
        "s1_3": _write_shards(out / "s1_3", _caption_samples(cfg, "s1_3", cfg.n_s1_3, exact=True),
                              cfg.samples_per_shard),
        # exact captions of the held-out scenes: the held-out caption loss and its other-image control
        "heldout": _write_shards(out / "heldout", _caption_samples(cfg, "heldout", cfg.n_heldout, exact=True),
                                 cfg.samples_per_shard),
    }
    jsonl = {
        "s1_3": "s1_3/" + _write_chats(out / "s1_3", "s1_3", cfg, cfg.n_s1_3, cfg.n_s1_3, _task_turns),
        "s2": "s2/" + _write_chats(out / "s2", "s2", cfg, cfg.n_s2, 0, tasks.chat),
    }
    _write_heldout(out / "heldout", cfg)
    manifest = {
        "config": asdict(cfg),
        "shards": {k: [f"{k}/{n}" for n in v] for k, v in shards.items()},
        "jsonl": jsonl,
        "heldout": "heldout/questions.json",
        "probes": "heldout/probes.json",
        "counts": {"s1_1": cfg.n_s1_1, "s1_2": cfg.n_s1_2, "s1_3_captions": cfg.n_s1_3,
                   "s1_3_tasks": cfg.n_s1_3, "s2": cfg.n_s2, "heldout": cfg.n_heldout,
                   "heldout_captions": cfg.n_heldout},
        "seconds": round(time.perf_counter() - t0, 2),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest
