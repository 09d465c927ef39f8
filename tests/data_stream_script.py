"""Run in a NEW process by the data tests: rebuild loaders from saved states, write what they yield.

    python tests/data_stream_script.py JOB.pt     JOB = {"tokenizer": path, "jobs": [{"cfg": DataConfig,
        "model_cfg", "rank", "world_size", "state" (or None), "n": batches}], "out": path}
writes out = [{"batches": [...], "state": loader.state_dict() after them, "stats": ...}].
"""
import pickle
import sys

import torch

from evip.data.loader import build_loader


def main(job_path: str) -> None:
    job = torch.load(job_path, weights_only=False)
    with open(job["tokenizer"], "rb") as f:
        tok = pickle.load(f)
    results = []
    for j in job["jobs"]:
        loader = build_loader(j["cfg"], tok, j["model_cfg"], j["rank"], j["world_size"])
        if j["state"] is not None:
            loader.load_state_dict(j["state"])
        it = iter(loader)
        batches = [next(it) for _ in range(j["n"])]
        results.append({"batches": batches, "state": loader.state_dict(), "stats": loader.stats()})
        del it
    torch.save(results, job["out"])


if __name__ == "__main__":
    main(sys.argv[1])
