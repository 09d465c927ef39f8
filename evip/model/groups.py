"""Parameter groups: the words stage configs use to say what trains.

Every parameter of `MonoInternVL` belongs to exactly one group, decided by its module path
component by component (never by substring: `attention` must not catch `attention_norm`).
"""
from __future__ import annotations

from torch import nn

GROUPS = ("patch_embed", "visual_ffn", "visual_attn", "attention", "text_ffn", "norms", "embeddings", "head")

_TOP = {"vision": "patch_embed", "mlp1": "patch_embed", "tok_embeddings": "embeddings",
        "output": "head", "norm": "norms"}
_LAYER = {"attention_norm": "norms", "ffn_norm": "norms", "attention": "attention",
          "attention_ve": "visual_attn", "feed_forward": "text_ffn", "feed_forward_ve": "visual_ffn"}


def group_of(param_name: str) -> str:
    """The group of a `MonoInternVL` parameter name (a state_dict key)."""
    parts = param_name.split(".")
    if len(parts) >= 2 and parts[0] in _TOP:
        return _TOP[parts[0]]
    if len(parts) >= 4 and parts[0] == "layers" and parts[1].isdigit() and parts[2] in _LAYER:
        return _LAYER[parts[2]]
    raise KeyError(f"parameter {param_name!r} belongs to no parameter group {GROUPS}: "
                   "names must be MonoInternVL's (vision.*, mlp1.*, tok_embeddings.*, layers.N.<module>.*, "
                   "norm.*, output.*); strip any wrapper prefix such as 'module.'")


def named_groups(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """{group: [(name, parameter), ...]} for every group in GROUPS (empty lists included)."""
    out: dict[str, list[tuple[str, nn.Parameter]]] = {g: [] for g in GROUPS}
    for name, param in model.named_parameters():
        out[group_of(name)].append((name, param))
    return out
