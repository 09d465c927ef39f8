"""Resume: a loader state saved after k batches, restored in a NEW process (a subprocess), yields
exactly the batches the uninterrupted run yields next (torch.equal) — with 2 worker processes,
with 2 ranks, with a mixture, across an epoch boundary, and again from a resumed run's state."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_stream_helpers import (data_config, make_shards, model_config_for, real_tokenizer,
                                 tokenizer_pickle, write_recipe)
from evip.batch import BATCH_KEYS, LAYOUT_KEY, TENSOR_KEYS
from evip.data.loader import build_loader

SCRIPT = Path(__file__).with_name("data_stream_script.py")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    make_shards(d, "a", 3, 10)
    make_shards(d, "b", 1, 7)                 # small: cycles several epochs during the test
    mix = write_recipe(d / "mix.yaml", [
        {"name": "a", "paths": [str(d / "a-{00000..00002}.tar")], "weight": 2.0},
        {"name": "b", "paths": [str(d / "b-*.tar")], "weight": 1.0}])
    small = write_recipe(d / "small.yaml", [{"name": "b", "paths": [str(d / "b-00000.tar")]}])
    tok = real_tokenizer()
    return {"dir": d, "mix": mix, "small": small, "tok": tok, "tok_file": tokenizer_pickle(d),
            "model_cfg": model_config_for(tok)}


def _run(data, cfg, rank, world, n, state=None, loader_out=None):
    loader = build_loader(cfg, data["tok"], data["model_cfg"], rank, world)
    if state is not None:
        loader.load_state_dict(state)
    it = iter(loader)
    return loader, it, [next(it) for _ in range(n)]


def _in_new_process(data, jobs, tmp_path):
    job = tmp_path / "job.pt"
    out = tmp_path / "out.pt"
    torch.save({"tokenizer": str(data["tok_file"]), "jobs": jobs, "out": str(out)}, job)
    r = subprocess.run([sys.executable, str(SCRIPT), str(job)], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).parents[1])
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(out, weights_only=False)


def _equal(xs, ys):
    assert len(xs) == len(ys)
    for i, (x, y) in enumerate(zip(xs, ys)):
        assert set(x) == set(BATCH_KEYS) == set(y)
        for k in TENSOR_KEYS:
            assert torch.equal(x[k], y[k]), f"batch {i}, {k}"
        assert x[LAYOUT_KEY] == y[LAYOUT_KEY], f"batch {i}, {LAYOUT_KEY}"


def test_resume_in_new_process_workers_ranks_mixture_epochs_and_resume_twice(data, tmp_path):
    cases = [  # (recipe, rank, world, workers, k): the state is taken after k batches
        ("mix", 0, 1, 2, 3),                  # 2 worker processes, a mixture
        ("mix", 1, 2, 2, 2),                  # rank 1 of 2 (each rank's loader is independent)
        ("small", 0, 1, 2, 5),                # 7 samples over 2 workers: k=5 is past epoch ends
    ]
    n, m = 4, 3
    refs, jobs = [], []
    for recipe, rank, world, workers, k in cases:
        cfg = data_config(data[recipe], num_workers=workers)
        loader, it, batches = _run(data, cfg, rank, world, k)
        state = loader.state_dict()
        batches += [next(it) for _ in range(n + m)]
        refs.append(batches[k:])
        jobs.append({"cfg": cfg, "model_cfg": data["model_cfg"], "rank": rank, "world_size": world,
                     "state": state, "n": n})
        del it, loader
    epochs = [s["stream"]["sources"][0]["epoch"] for s in jobs[2]["state"]["slots"].values()]
    results = _in_new_process(data, jobs, tmp_path)
    for ref, res in zip(refs, results):
        _equal(res["batches"], ref[:n])
    assert max(epochs) >= 1                   # the saved state was already past an epoch boundary
    # second resume: the state of the resumed run (taken in the subprocess) restored here
    for (recipe, rank, world, workers, _), ref, res in zip(cases, refs, results):
        cfg = data_config(data[recipe], num_workers=workers)
        _, it, again = _run(data, cfg, rank, world, m, state=res["state"])
        _equal(again, ref[n:n + m])
        del it


def test_resume_with_no_worker_processes(data):
    cfg = data_config(data["mix"], num_workers=0)
    loader, it, _ = _run(data, cfg, 0, 1, 2)
    state = loader.state_dict()
    ref = [next(it) for _ in range(3)]
    _, _, got = _run(data, cfg, 0, 1, 3, state=state)
    _equal(got, ref)


def test_same_seed_same_batches_other_seed_other_batches(data):
    cfg = data_config(data["mix"], num_workers=2)
    _, _, a = _run(data, cfg, 0, 1, 3)
    _, _, b = _run(data, cfg, 0, 1, 3)
    _equal(a, b)
    _, _, c = _run(data, data_config(data["mix"], num_workers=2, seed=1), 0, 1, 3)
    assert not all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, c))
