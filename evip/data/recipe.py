"""Data recipes: what a stage reads, as a weighted mixture of sources (data_recipes/*.yaml).

    recipe = load_recipe("data_recipes/s2_instruct.yaml", overrides=["sources.0.root=/data/llava"])

Everything that can be checked without reading samples is checked here, before any DataLoader
worker starts, and each error names the key and the file: a required root left as `???`, a
pattern that matches no shard, a non-positive weight, an unknown kind, format or template.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from omegaconf import MISSING

from evip.batch import KINDS
from evip.config import ConfigError, load_config

FORMATS = ("webdataset", "jsonl", "hf")


@dataclass
class SourceConfig:
    name: str = MISSING
    kind: str = "caption"                 # caption | chat | text
    format: str = "webdataset"            # webdataset | jsonl | hf
    # webdataset: tar paths, globs, brace ranges ("shard-{00000..00099}.tar") or "pipe:CMD";
    # jsonl: .jsonl files (globs ok); hf: parquet/arrow files, or one `save_to_disk` directory.
    paths: list[str] = field(default_factory=list)
    root: str = ""                        # base directory: jsonl image paths are relative to it;
                                          # usable in paths as "${..root}/..."
    weight: float = 1.0                   # relative, > 0
    template: str = ""                    # '' or the kind's name: the kind's default template
    filters: dict[str, Any] = field(default_factory=dict)   # FilterConfig fields (evip/data/filters.py)
    shuffle_within_shard: bool = True     # seeded permutation of members (needs seekable shards)
    interleave_shards: int = 4            # shards each (rank, worker) reads at once, record by record
                                          # in turn (a cross-shard shuffle); 1: one shard after another
    rows_per_shard: int = 1024            # jsonl/hf: rows per virtual shard (unit of work/shuffle)
    image_column: str = "image"           # hf
    text_column: str = "text"             # hf (caption/text kinds)
    conversations_column: str = "conversations"   # hf (chat kind)
    streaming: bool = False               # hf: load_dataset(paths[0] or the files, streaming=True);
                                          # its shards are read forward (no within-shard shuffle)
    split: str = "train"                  # hf streaming


@dataclass
class RecipeConfig:
    name: str = ""
    sources: list[SourceConfig] = field(default_factory=list)


def resolve_template(src: SourceConfig) -> str:
    """The template name to give the sample builder ('' = the kind's default); ValueError when it
    cannot format the source's kind (evip/data/text.py owns the names)."""
    from evip.data.text import check_template
    check_template(src.kind, src.template)
    return src.template


def filter_config(src: SourceConfig, base=None):
    """`base` (a FilterConfig; defaults when None) with the source's `filters` merged over it."""
    from dataclasses import asdict

    from evip.data.filters import FilterConfig
    merged = {**(asdict(base) if base is not None else {}), **dict(src.filters)}
    return FilterConfig.from_dict(merged, where=f"the filters of source {src.name!r}")


def validate_recipe(recipe: RecipeConfig, where: str = "the recipe") -> None:
    """Raise ConfigError naming `sources.I.KEY` and the file for the first problem found."""
    from evip.data.shards import expand_paths

    if not recipe.sources:
        raise ConfigError(f"'sources' in {where} is empty: list at least one source")
    names = set()
    for i, src in enumerate(recipe.sources):
        key = f"sources.{i}"
        if src.name in names:
            raise ConfigError(f"'{key}.name' in {where}: duplicate source name {src.name!r}")
        names.add(src.name)
        if src.kind not in KINDS:
            raise ConfigError(f"'{key}.kind' in {where}: unknown kind {src.kind!r}; use one of {list(KINDS)}")
        if src.format not in FORMATS:
            raise ConfigError(f"'{key}.format' in {where}: unknown format {src.format!r}; "
                              f"use one of {list(FORMATS)}")
        try:
            resolve_template(src)
        except ValueError as e:
            raise ConfigError(f"'{key}.template' in {where}: {e}") from None
        try:
            filter_config(src)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"'{key}.filters' in {where}: {e}") from None
        if not src.weight > 0:
            raise ConfigError(f"'{key}.weight' in {where}: weight must be > 0, got {src.weight}")
        if src.interleave_shards < 1:
            raise ConfigError(f"'{key}.interleave_shards' in {where}: must be >= 1, got {src.interleave_shards}")
        if src.rows_per_shard < 1:
            raise ConfigError(f"'{key}.rows_per_shard' in {where}: must be >= 1, got {src.rows_per_shard}")
        if not src.paths:
            raise ConfigError(f"'{key}.paths' in {where}: no paths given for source {src.name!r}")
        for j, pattern in enumerate(src.paths):
            if src.format == "hf" and src.streaming and j == 0 and not expand_paths([pattern]):
                continue                      # a hub dataset name, resolved by `datasets`
            if not expand_paths([pattern]):
                raise ConfigError(f"'{key}.paths.{j}' in {where}: no shards match {pattern!r} "
                                  f"(source {src.name!r}); check the path or fill in its root")
        if src.format == "jsonl" and src.kind != "text" and src.root and not Path(src.root).is_dir():
            raise ConfigError(f"'{key}.root' in {where}: image root {src.root!r} is not a directory")


def _raw_recipe(path: Path, overrides: Sequence[str]) -> dict:
    """The YAML with the overrides applied (list items addressed as `sources.0.root=...`), and no
    `???` left: merged into the schema, a `???` would silently keep the field's default."""
    import yaml
    from omegaconf import OmegaConf
    if not path.is_file():
        raise ConfigError(f"recipe file not found: {path}")
    try:
        raw = OmegaConf.load(path)
    except Exception as e:
        raise ConfigError(f"cannot parse {path}: {e}") from None
    for o in overrides:
        key, eq, value = o.partition("=")
        if not eq:
            raise ConfigError(f"recipe override {o!r} is not of the form key=value")
        try:
            OmegaConf.update(raw, key, yaml.safe_load(value), merge=True)
        except Exception as e:
            raise ConfigError(f"recipe override {o!r} does not apply to {path}: {e}") from None
    missing = sorted(_missing(OmegaConf.to_container(raw, resolve=False)))
    if missing:
        raise ConfigError(f"required value '{missing[0]}' is missing: fill it in in {path} or pass "
                          f"{missing[0]}=... in data.recipe_overrides")
    return OmegaConf.to_container(raw, resolve=False)


def _missing(node, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        items = node.items()
    elif isinstance(node, list):
        items = enumerate(node)
    else:
        return [prefix] if node == "???" else []
    return [k for key, v in items for k in _missing(v, f"{prefix}.{key}" if prefix else str(key))]


def _is_relative(p: str) -> bool:
    return bool(p) and not p.startswith(("pipe:", "~", "/")) and "://" not in p and not Path(p).is_absolute()


def resolve_relative(recipe: RecipeConfig, path: Path) -> RecipeConfig:
    """The path rule: a relative `root` or shard path in a recipe is relative to the recipe file.
    For recipes written before this rule, a relative path that matches nothing beside the recipe
    but matches from the working directory is still read from there, with a warning naming it."""
    import warnings

    from evip.data.shards import expand_paths
    here = path.resolve().parent
    for i, src in enumerate(recipe.sources):
        if _is_relative(src.root):
            if not (here / src.root).is_dir() and Path(src.root).is_dir():
                warnings.warn(f"'sources.{i}.root' {src.root!r} in {path} is read from the working "
                              f"directory ({Path(src.root).resolve()}); relative paths in a recipe are "
                              f"relative to the recipe file: write it so", stacklevel=3)
            else:
                src.root = str(here / src.root)
        paths = []
        for j, p in enumerate(src.paths):
            p = str(p)
            if _is_relative(p) and not expand_paths([str(here / p)]) and expand_paths([p]):
                warnings.warn(f"'sources.{i}.paths.{j}' {p!r} in {path} is read from the working "
                              f"directory; relative paths in a recipe are relative to the recipe file: "
                              f"write it so", stacklevel=3)
            elif _is_relative(p) and not (src.format == "hf" and src.streaming and j == 0
                                          and not expand_paths([str(here / p)])):
                p = str(here / p)
            paths.append(p)
        src.paths = paths
    return recipe


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> RecipeConfig:
    """Load, merge overrides and validate a recipe; raises ConfigError naming key and file.
    Relative paths in it are relative to the recipe file (`resolve_relative`)."""
    raw = _raw_recipe(Path(path), overrides)
    try:
        recipe = load_config(RecipeConfig, base=raw)
    except ConfigError as e:
        raise ConfigError(str(e).replace("the base config", str(path))) from None
    validate_recipe(resolve_relative(recipe, Path(path)), str(path))
    return recipe
