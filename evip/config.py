"""Typed configs: a dataclass schema merged with YAML files and dotlist overrides (OmegaConf).

    cfg = load_config(StageConfig, "stages/s1_1_concept.yaml", ["optim.lr=1e-4"])

Every problem is reported before any heavy work, as a ConfigError that names the key and the
file it came from: an unknown key, a value of the wrong type, a required value left missing.

The path rule: every file a config names is relative to the file that names it. A relative path
in a YAML file (a stage's `data.recipe`, `eval.heldout_data.recipe`, `eval.text_corpus`,
`eval.caption_images`; a pipeline's `base.source`, `base.tokenizer`; `defaults:`; a pipeline's
`stages.N.file` and the `key=value` overrides it lists for its stages) is read from that file's
directory; one given on the command line, from the working directory. Relative paths inside a
recipe are relative to the recipe (evip/data/recipe.py). Named assets are not paths:
`smollm2` (or `asset:smollm2`) is the real SmolLM2-135M-Instruct bundled with evip, as the HF
directory built once from its GGUF (`smollm2-gguf`, evip/assets.py); `random` and `pydoc` keep their meaning. A relative path that does not exist
beside its file but does from the working directory (configs written before this rule) is read
from there, with a warning that names it.
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


# dotted keys holding file paths, per schema (the path rule above); values in RESERVED are not paths
PATH_KEYS = {
    "StageConfig": ("data.recipe", "eval.heldout_data.recipe", "eval.text_corpus", "eval.caption_images"),
    "PipelineConfig": ("base.source", "base.tokenizer"),
    "DataConfig": ("recipe",),
}
RESERVED = {"", "???", "random", "pydoc"}
# alternatives, per schema: a layer (a file, the overrides) that sets one to a non-zero value and not
# the other sets the other to 0 (`steps=N` on the command line replaces a stage file's `tokens`)
ALTERNATIVES = {"StageConfig": (("steps", "tokens"),)}


def resolve_path(value: str, base: Path | None, key: str = "", where: str = "") -> str:
    """One value under the path rule: a named asset -> its path; an absolute path, a reserved word
    or an interpolation -> unchanged; a relative path -> `base / value` (base None, the command
    line: from the working directory, made absolute when it exists, so a saved config still
    points at it), or the working-directory path (absolute) with a warning when only that exists."""
    import os
    import warnings

    from evip.assets import named_asset
    if not isinstance(value, str) or value in RESERVED or "${" in value:
        return value
    try:
        asset = named_asset(value)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"'{key}' in {where}: {e}") from None
    if asset is not None:
        return str(asset)
    if os.path.isabs(os.path.expanduser(value)) or value.startswith("~"):
        return value
    if base is None:                  # the command line: the working directory, made absolute so
        return str(Path(value).absolute()) if Path(value).exists() else value   # saved configs hold
    beside = base / value
    if not beside.exists() and Path(value).exists():
        warnings.warn(f"'{key}' {value!r} in {where} is read from the working directory "
                      f"({Path(value).resolve()}); a path in a config file is relative to that file "
                      f"({base}): write it so", stacklevel=4)
        return str(Path(value).absolute())
    return str(beside)


def _path_rule_node(node, keys: Sequence[str], base: Path | None, where: str) -> None:
    """Apply `resolve_path` in place to the `keys` present in an OmegaConf node."""
    for key in keys:
        value = OmegaConf.select(node, key, default=None, throw_on_missing=False)
        if value is None:
            continue
        if OmegaConf.is_list(value):
            OmegaConf.update(node, key, [resolve_path(v, base, key, where) for v in value], merge=False)
        elif isinstance(value, str):
            OmegaConf.update(node, key, resolve_path(value, base, key, where), merge=False)


def path_rule_dotlist(overrides: Sequence[str], keys: Sequence[str], base: Path | None, where: str) -> list[str]:
    """`key=value` overrides with `resolve_path` applied to those naming a path key (for overrides
    written in a file, `base` is that file's directory; on the command line, None)."""
    out = []
    for o in overrides:
        key, eq, value = o.partition("=")
        # a stage's keys may come prefixed (stages_all.data.recipe, s1.data.recipe) or not
        hit = next((k for k in keys if key == k or key.endswith("." + k)), None)
        # `key=""` / `key=''` is the empty string (OmegaConf's dotlist reads it so), not a path
        if eq and hit and not value.startswith("[") and value not in ('""', "''"):
            o = f"{key}={resolve_path(value, base, key, where)}"
        out.append(o)
    return out


def _alternatives(cfg, layer, schema) -> None:
    """The later layer's choice among ALTERNATIVES wins (see there)."""
    if not OmegaConf.is_dict(layer):
        return
    for a, b in ALTERNATIVES.get(schema.__name__, ()):
        for one, other in ((a, b), (b, a)):
            if one in layer and other not in layer and layer[one] not in (0, None, "0"):
                cfg[other] = 0


def _alternatives_dotlist(overrides: list[str], schema) -> list[str]:
    """In a list of overrides the alternative set last to a non-zero value wins: the other is set to
    0 after it (`tokens=0` need not be added to `steps=N`)."""
    for a, b in ALTERNATIVES.get(schema.__name__, ()):
        last = None
        for o in overrides:
            key, _, value = o.partition("=")
            if key in (a, b) and value.strip() not in ("0", "0.0", ""):
                last = key
        if last is not None:
            overrides = overrides + [f"{b if last == a else a}=0"]
    return overrides


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
    keys = PATH_KEYS.get(schema.__name__, ())
    for p in paths:
        for layer, source in _yaml_layers(Path(p)):
            if keys and OmegaConf.is_dict(layer):
                _path_rule_node(layer, keys, Path(source).parent, source)
            cfg = _merge_one(cfg, layer, source)
            _alternatives(cfg, layer, schema)
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"override {bad[0]!r} on the command line is not of the form key=value")
        overrides = path_rule_dotlist(overrides, keys, None, "the command line")
        overrides = _alternatives_dotlist(list(overrides), schema)
        cfg = _merge_one(cfg, OmegaConf.from_dotlist(overrides), "the command-line overrides")
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        where = ", ".join(str(p) for p in paths) or "the command line"
        raise ConfigError(f"required value '{missing[0]}' is missing: set it in {where} "
                          f"or on the command line as {missing[0]}=...")
    return OmegaConf.to_object(cfg)


def to_yaml(cfg: Any) -> str:
    """The config as YAML (for run directories and `--print-config`)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
