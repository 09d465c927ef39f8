"""What an exported model needs beside its weights to be served as it was trained: the tiling
settings, the chat template (in the tokenizer files) and generation_config.json.

    serving = ServingConfig.from_sample(stage.data.sample)   # the trained stage's tiling + system prompt
    save_serving_files(tokenizer, "out/", serving, pad_token_id)

The tokenizer files are written so that transformers 4.x (the released Mono-InternVL code, vLLM,
LMDeploy) and 5.x both load them: `tokenizer_class` names a class every version has, the added
special tokens are listed under the 4.x key too, and the chat template sits in
tokenizer_config.json as well as in chat_template.jinja.
"""
from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evip.model.tokens import IM_END, IM_START


@dataclass(frozen=True)
class ServingConfig:
    """The image tiling and system prompt the model was trained with (InternVL's config names)."""
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 6
    use_thumbnail: bool = True
    system_prompt: str = ""

    @classmethod
    def from_sample(cls, sample_cfg: Any) -> "ServingConfig":
        """From a stage's `data.sample` (evip.data.sample.SampleConfig)."""
        image = sample_cfg.image
        return cls(min_dynamic_patch=int(image.min_tiles), max_dynamic_patch=int(image.max_tiles),
                   use_thumbnail=bool(image.use_thumbnail), system_prompt=str(sample_cfg.system_prompt))


def chat_template(system_prompt: str = "") -> str:
    """The training chat format (evip/data/text.py, internlm2-chat) as a Jinja chat template: a system
    turn with `system_prompt` when the conversation has none, `<|im_start|>{role}\\n{content}<|im_end|>\\n`
    per turn, and `<|im_start|>assistant\\n` as the generation prompt. Images are `<image>` in the
    content, which the servers replace by the image block."""
    system = ""
    if system_prompt:
        literal = json.dumps(f"{IM_START}system\n{system_prompt}{IM_END}\n")   # a valid Jinja string literal
        system = "{%- if not messages or messages[0]['role'] != 'system' %}{{ " + literal + " }}{%- endif %}"
    return (system
            + "{%- for message in messages %}{{ '" + IM_START + "' + message['role'] + '\\n' + message['content']"
            + " + '" + IM_END + "' + '\\n' }}{%- endfor %}"
            + "{%- if add_generation_prompt %}{{ '" + IM_START + "assistant\\n' }}{%- endif %}")


def stop_token_ids(tokenizer: Any) -> list[int]:
    """The ids that end an answer: the turn end <|im_end|> (what training taught) and the tokenizer's eos."""
    ids = []
    if IM_END in tokenizer.get_vocab():
        ids.append(int(tokenizer.convert_tokens_to_ids(IM_END)))
    if tokenizer.eos_token_id is not None and int(tokenizer.eos_token_id) not in ids:
        ids.append(int(tokenizer.eos_token_id))
    return ids


def legacy_bpe_merges(path: Path) -> None:
    """tokenizers >= 0.20 writes a BPE model's merges as pairs ["a", "b"]; the tokenizers the released
    Mono-InternVL code pins (0.15, with transformers 4.37) reads only "a b" strings and fails on the
    pairs ("data did not match any variant of untagged enum ModelWrapper"). Every version reads the
    strings, so they are written that way whenever no piece holds a space (byte-level BPE: never)."""
    if not path.is_file():
        return
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model") or {}
    merges = model.get("merges")
    if model.get("type") != "BPE" or not merges or not isinstance(merges[0], list):
        return
    if any(" " in piece for pair in merges for piece in pair):
        return
    model["merges"] = [" ".join(pair) for pair in merges]
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")


def save_serving_files(tokenizer: Any, directory: str | Path, serving: ServingConfig, pad_token_id: int) -> None:
    """Tokenizer files (with the image tokens and the chat template) and generation_config.json."""
    directory = Path(directory)
    tok = copy.deepcopy(tokenizer)          # the caller's tokenizer keeps its own chat template
    template = chat_template(serving.system_prompt)
    tok.chat_template = template
    tok.save_pretrained(str(directory))
    legacy_bpe_merges(directory / "tokenizer.json")
    cfg_path = directory / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = template                       # transformers < 4.43 read it only here
    if (directory / "tokenizer.json").is_file() and cfg.get("tokenizer_class") in (None, "TokenizersBackend"):
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"  # 5.x's generic name is unknown to 4.x
    extra = cfg.get("extra_special_tokens")
    if isinstance(extra, list):                            # 4.50-4.57 expect a dict under this key
        cfg["additional_special_tokens"] = cfg.pop("extra_special_tokens")
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
    generation = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": stop_token_ids(tokenizer),
                  "pad_token_id": pad_token_id}
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2))


# The released checkpoints' modelling files that config.json's auto_map names (mono2b_layout.AUTO_MAP),
# and conversation.py, which modeling_internvl_chat.py imports for its chat template.
REMOTE_CODE = ("configuration_internvl_chat.py", "modeling_internvl_chat.py", "configuration_intern_vit.py",
               "modeling_intern_vit.py", "configuration_internlm2.py", "modeling_internlm2_ve.py",
               "conversation.py")


def remote_code_files(source: str | Path) -> list[Path]:
    """The *.py files of a local copy of a released Mono-InternVL checkpoint; FileNotFoundError naming
    what is missing when it does not hold the files auto_map names."""
    source = Path(source)
    missing = [name for name in REMOTE_CODE if not (source / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{source} lacks {', '.join(missing)}: pass --remote-code a local copy of a "
                                "released Mono-InternVL checkpoint (e.g. OpenGVLab/Mono-InternVL-2B)")
    return sorted(source.glob("*.py"))


def copy_remote_code(files: list[Path], directory: str | Path) -> None:
    for f in files:
        shutil.copyfile(f, Path(directory) / f.name)
