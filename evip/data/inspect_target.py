"""What `evip data inspect TARGET` reads: a recipe, shards, or one stage of a stage/pipeline file.

    target = inspect_target("runs/pipeline.yaml", stage="s1_1_concept", overrides=[...])
    target.data      # the DataConfig the loader gets: recipe, token budget, tiles, filters
    target.tile_size, target.patch_size   # None: the caller's default

TARGET is one of:
- a recipe (a YAML with `sources:`): overrides are DataConfig keys (`token_budget=2048`);
- a shard folder (every `*.tar` in it), a `.tar` file or a glob (`out/shard-*.tar`): read as one
  webdataset source, of the `kind` the folder's manifest.json records (else `kind`, default
  caption); overrides are DataConfig keys;
- a stage file (a YAML with `data:`): that stage's data config (its recipe, token budget, rows,
  tiles, sizes and default filters); overrides are stage keys (`data.token_budget=512`);
- a pipeline file (a YAML with `stages:`) with `stage` = a stage name: that stage as the pipeline
  builds it (its `stages_all` and own overrides applied; overrides as for `evip run`), and the
  pipeline's tile and patch size.
"""
from __future__ import annotations

import glob
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from evip.config import ConfigError, load_config


@dataclass
class InspectTarget:
    data: object                  # DataConfig
    what: str                     # one line: what is being read
    tile_size: int | None = None
    patch_size: int | None = None


def _yaml_keys(path: Path) -> set[str]:
    from omegaconf import OmegaConf
    try:
        node = OmegaConf.load(path)
    except Exception as e:
        raise ConfigError(f"cannot parse {path}: {e}") from None
    return set(node.keys()) if OmegaConf.is_dict(node) else set()


def _shard_recipe(pattern: str, kind: str, workdir: Path) -> Path:
    """A one-source recipe over `pattern` (absolute), written in `workdir`."""
    recipe = workdir / "recipe.yaml"
    recipe.write_text(json.dumps({"name": "shards", "sources": [
        {"name": "shards", "kind": kind, "format": "webdataset", "paths": [pattern]}]}))
    return recipe


def inspect_target(target: str, stage: str = "", overrides: Sequence[str] = (), kind: str = "",
                   workdir: str | None = None) -> InspectTarget:
    """Resolve TARGET (see the module doc); ConfigError naming the fix when it is none of them."""
    from evip.data.loader import DataConfig

    path = Path(target)
    is_glob = glob.has_magic(target)
    if path.is_dir() or path.suffix == ".tar" or is_glob:
        if path.is_dir():
            shards = sorted(path.glob("*.tar"))
            if not shards:
                raise ConfigError(f"no *.tar shards in the folder {path}: build them with "
                                  f"`evip data build INPUT --out {path}`")
            pattern, manifest = str(path.resolve() / "*.tar"), path / "manifest.json"
        else:
            if not glob.glob(target):
                raise ConfigError(f"no shards match {target!r}")
            pattern, manifest = str(Path(target).absolute()), Path(glob.glob(target)[0]).parent / "manifest.json"
        if not kind:
            kind = json.loads(manifest.read_text()).get("kind", "caption") if manifest.is_file() else "caption"
        work = Path(workdir or tempfile.mkdtemp(prefix="evip-inspect-"))
        recipe = _shard_recipe(pattern, kind, work)
        data = load_config(DataConfig, None, [f"recipe={recipe}", *overrides])
        return InspectTarget(data, f"shards {pattern} ({kind})")
    if not path.is_file():
        raise ConfigError(f"{target}: no such recipe, stage or pipeline file, shard folder or glob")
    keys = _yaml_keys(path)
    if "stages" in keys:
        from evip.pipeline import load_pipeline
        lp = load_pipeline(path, ["base.source=random", *overrides])
        names = [ref.name for ref in lp.cfg.stages]           # the names overrides use
        found = [i for i, (ref, (st, _)) in enumerate(zip(lp.cfg.stages, lp.stages)) if stage in (ref.name, st.name)]
        if not found:
            raise ConfigError(f"--stage {stage!r}: {path} has the stages {', '.join(names)}; pass one "
                              f"of them" if stage else f"{path} is a pipeline: pass --stage NAME (one of "
                              f"{', '.join(names)})")
        st = lp.stages[found[0]][0]
        model = dict(lp.cfg.model)
        return InspectTarget(st.data, f"stage {st.name} of {path}", model.get("image_size"), model.get("patch_size"))
    if "data" in keys:
        from evip.stages import load_stage
        st = load_stage(path, list(overrides))
        if stage and stage != st.name:
            raise ConfigError(f"--stage {stage!r}: {path} is the stage {st.name!r}")
        return InspectTarget(st.data, f"stage {st.name} ({path})")
    if "sources" in keys:
        data = load_config(DataConfig, None, [f"recipe={target}", *overrides])
        return InspectTarget(data, f"recipe {path}")
    raise ConfigError(f"{path} is neither a recipe (`sources:`), a stage (`data:`) nor a pipeline (`stages:`)")
