"""Typed configs: a dataclass schema merged with YAML files and dotlist overrides (OmegaConf).

    cfg = load_config(StageConfig, "stages/s1_1_concept.yaml", ["optim.lr=1e-4"])

Every problem is reported before any heavy work, as a ConfigError that names the key and the
file it came from: an unknown key, a value of the wrong type, a required value left missing.
"""
from __future__ import annotations

from dataclasses import is_dataclass
from pathlib import Path
from typing import Any, Sequence, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value is wrong; the message names the key, the source and the fix."""


def _key_of(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or getattr(err, "key", None)
    return str(key) if key else "?"


def _merge_one(base, layer, source: str):
    try:
        return OmegaConf.merge(base, layer)
    except ConfigKeyError as e:
        raise ConfigError(f"unknown key '{_key_of(e)}' in {source}: "
                          f"check its spelling against the schema {OmegaConf.get_type(base).__name__}") from None
    except ValidationError as e:
        raise ConfigError(f"wrong type for '{_key_of(e)}' in {source}: {e.msg}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"bad value for '{_key_of(e)}' in {source}: {e.msg}") from None


def _yaml_layers(path: Path) -> list[tuple[Any, str]]:
    """A YAML file may name a parent with `defaults: [other.yaml]` (paths relative to it)."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        node = OmegaConf.load(path)
    except Exception as e:  # yaml syntax errors
        raise ConfigError(f"cannot parse {path}: {e}") from None
    layers: list[tuple[Any, str]] = []
    parents = node.pop("defaults", None) if isinstance(node, dict) or OmegaConf.is_dict(node) else None
    for parent in parents or []:
        layers += _yaml_layers((path.parent / str(parent)).resolve())
    layers.append((node, str(path)))
    return layers


def load_config(schema: type[T], paths: str | Path | Sequence[str | Path] | None = None,
                overrides: Sequence[str] = (), base: Any = None) -> T:
    """Merge `schema` defaults, then each YAML in `paths`, then `overrides` (a dotlist).

    Returns a real instance of `schema` (a dataclass), validated. `base` is an optional
    dict/dataclass layered between the schema defaults and the files.
    """
    if not is_dataclass(schema):
        raise TypeError(f"{schema} is not a dataclass")
    if paths is None:
        paths = []
    elif isinstance(paths, (str, Path)):
        paths = [paths]
    cfg = OmegaConf.structured(schema)
    if base is not None:
        cfg = _merge_one(cfg, OmegaConf.structured(base) if is_dataclass(base) else OmegaConf.create(base),
                         "the base config")
    for p in paths:
        for layer, source in _yaml_layers(Path(p)):
            cfg = _merge_one(cfg, layer, source)
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"override {bad[0]!r} on the command line is not of the form key=value")
        cfg = _merge_one(cfg, OmegaConf.from_dotlist(list(overrides)), "the command-line overrides")
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        where = ", ".join(str(p) for p in paths) or "the command line"
        raise ConfigError(f"required value '{missing[0]}' is missing: set it in {where} "
                          f"or on the command line as {missing[0]}=...")
    return OmegaConf.to_object(cfg)


def to_yaml(cfg: Any) -> str:
    """The config as YAML (for run directories and `--print-config`)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
