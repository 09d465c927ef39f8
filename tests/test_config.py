"""The typed config loader: merging order and errors that name the key and the file."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from evip.config import ConfigError, load_config, to_yaml
from omegaconf import MISSING


@dataclass
class Optim:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class Schema:
    name: str = MISSING
    steps: int = 10
    groups: list[str] = field(default_factory=lambda: ["visual_ffn"])
    optim: Optim = field(default_factory=Optim)


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_merge_order_defaults_file_overrides(tmp_path):
    p = write(tmp_path, "a.yaml", "name: s1\nsteps: 20\noptim:\n  lr: 0.5\n")
    cfg = load_config(Schema, p, ["optim.lr=0.25", "groups=[a,b]"])
    assert isinstance(cfg, Schema) and isinstance(cfg.optim, Optim)
    assert (cfg.name, cfg.steps, cfg.optim.lr, cfg.groups) == ("s1", 20, 0.25, ["a", "b"])
    assert "lr: 0.25" in to_yaml(cfg)


def test_defaults_chain_relative_to_file(tmp_path):
    write(tmp_path, "base.yaml", "name: base\nsteps: 7\n")
    child = write(tmp_path, "child.yaml", "defaults: [base.yaml]\nsteps: 9\n")
    cfg = load_config(Schema, child)
    assert (cfg.name, cfg.steps) == ("base", 9)


def test_unknown_key_names_key_and_file(tmp_path):
    p = write(tmp_path, "bad.yaml", "name: x\noptim:\n  lrr: 1\n")
    with pytest.raises(ConfigError, match=r"unknown key 'optim.lrr' in .*bad.yaml"):
        load_config(Schema, p)


def test_wrong_type_names_key_and_file(tmp_path):
    p = write(tmp_path, "bad.yaml", "name: x\nsteps: many\n")
    with pytest.raises(ConfigError, match=r"wrong type for 'steps' in .*bad.yaml"):
        load_config(Schema, p)


def test_wrong_type_on_command_line():
    with pytest.raises(ConfigError, match=r"'optim.lr' in the command-line overrides"):
        load_config(Schema, None, ["name=x", "optim.lr=fast"])


def test_missing_required_value_names_key(tmp_path):
    p = write(tmp_path, "a.yaml", "steps: 3\n")
    with pytest.raises(ConfigError, match=r"required value 'name' is missing: set it in .*a.yaml"):
        load_config(Schema, p)


def test_missing_file_and_malformed_override(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Schema, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(Schema, None, ["name"])
