"""The config system: strict typed loading, includes, dotted overrides, one-line errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

import mythos
from mythos.config import CONFIG_DIR, ConfigError, apply_overrides, dump_yaml, from_dict, load_config


@dataclass(kw_only=True)
class Inner:
    lr: float = 1e-3
    steps: int = 10
    mode: Literal["a", "b"] = "a"
    tags: list[str] = field(default_factory=list)


@dataclass(kw_only=True)
class Outer:
    name: str = "x"
    flag: bool = False
    limit: int | None = None
    inner: Inner = field(default_factory=Inner)


def test_strict_types_and_unknown_keys() -> None:
    cfg = from_dict(Outer, {"name": "run", "inner": {"lr": 1, "steps": 5, "tags": ["p"]}})
    assert cfg.inner.lr == 1.0 and isinstance(cfg.inner.lr, float) and cfg.inner.tags == ["p"]
    with pytest.raises(ConfigError, match=r"unknown config key 'inner.lrr'.*valid keys: lr, mode, steps, tags"):
        from_dict(Outer, {"inner": {"lrr": 1}})
    with pytest.raises(ConfigError, match=r"'inner.steps'.*expected int, got str"):
        from_dict(Outer, {"inner": {"steps": "ten"}})
    with pytest.raises(ConfigError, match=r"'flag'.*expected bool"):
        from_dict(Outer, {"flag": 1})
    with pytest.raises(ConfigError, match=r"'inner.mode'.*'c' is not one of 'a', 'b'"):
        from_dict(Outer, {"inner": {"mode": "c"}})
    assert from_dict(Outer, {"limit": None}).limit is None
    assert from_dict(Outer, {"inner": {"steps": 1e3}}).inner.steps == 1000


def test_overrides_parse_yaml_scalars() -> None:
    raw = apply_overrides({}, ["inner.lr=3e-4", "flag=true", "name=hello", "inner.tags=[a, b]", "--limit=7"])
    cfg = from_dict(Outer, raw)
    assert cfg.inner.lr == 3e-4 and cfg.flag is True and cfg.name == "hello"
    assert cfg.inner.tags == ["a", "b"] and cfg.limit == 7
    with pytest.raises(ConfigError, match="must look like key.sub=value"):
        apply_overrides({}, ["inner.lr"])
    with pytest.raises(ConfigError, match="'limit' is a value, not a section"):
        apply_overrides({"limit": 3}, ["limit.sub=1"])


def test_includes_and_overrides_on_top(tmp_path: Path) -> None:
    (tmp_path / "inner.yaml").write_text("lr: 0.5\nsteps: 3\n")
    (tmp_path / "run.yaml").write_text("name: r\ninner:\n  include: inner.yaml\n  steps: 4\n")
    cfg = load_config(Outer, tmp_path / "run.yaml", ["inner.mode=b"])
    assert (cfg.inner.lr, cfg.inner.steps, cfg.inner.mode) == (0.5, 4, "b")
    (tmp_path / "run2.yaml").write_text("inner: inner.yaml\n")
    assert load_config(Outer, tmp_path / "run2.yaml", ["inner.steps=9"]).inner.steps == 9
    (tmp_path / "bad.yaml").write_text("inner: {include: inner.yaml, nope: 1}\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'inner.nope' \(from inner.yaml\)"):
        load_config(Outer, tmp_path / "bad.yaml")


def test_command_line_errors_name_the_override_not_the_file(tmp_path: Path) -> None:
    """Issue 24: a typo on the command line was reported as "(in run.yaml)"."""
    (tmp_path / "inner.yaml").write_text("lr: 0.5\n")
    (tmp_path / "run.yaml").write_text("name: r\ninner: inner.yaml\n")
    with pytest.raises(ConfigError) as exc:
        load_config(Outer, tmp_path / "run.yaml", ["inner.lrr=1"])
    assert str(exc.value).startswith("unknown config key 'inner.lrr' in the command-line override 'inner.lrr=1'; "
                                     "valid keys of inner: lr, mode, steps, tags"), exc.value
    with pytest.raises(ConfigError, match=r"unknown config key 'nmae' in the command-line override 'nmae=x'"):
        load_config(Outer, tmp_path / "run.yaml", ["--nmae=x"])
    for item, key in (("inner.steps=ten", "inner.steps"), ("--flag=1", "flag"), ("inner.tags=[a, [b]]", "inner.tags")):
        with pytest.raises(ConfigError) as exc:  # a value error in an included section, and in the file's own
            load_config(Outer, tmp_path / "run.yaml", [item])
        msg = str(exc.value)
        assert f"config key '{key}" in msg and f"(from the command-line override '{item.removeprefix('--')}')" in msg
        assert "run.yaml" not in msg and "inner.yaml" not in msg, msg
    (tmp_path / "typo.yaml").write_text("name: r\nlimt: 3\n")  # the file's own mistake still names the file
    with pytest.raises(ConfigError, match=r"unknown config key 'limt' \(in .*typo.yaml\)"):
        load_config(Outer, tmp_path / "typo.yaml", ["inner.steps=2"])


def test_file_errors_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="config not found: 'nope.yaml'"):
        load_config(Outer, "nope.yaml")
    monkeypatch.chdir(mythos.config.REPO_ROOT)  # the cwd is the repo root: each path is still tried once
    with pytest.raises(ConfigError) as exc:
        load_config(Outer, "nope.yaml", kind="run")
    tried = str(exc.value).split("(tried ")[1].rstrip(")").split(", ")
    assert len(tried) == len(set(tried)) == 2, tried
    (tmp_path / "broken.yaml").write_text("a: [1,\n")
    with pytest.raises(ConfigError) as exc:
        load_config(Outer, tmp_path / "broken.yaml")
    assert "invalid YAML" in str(exc.value) and "\n" not in str(exc.value)


def test_every_model_preset_validates_and_round_trips() -> None:
    for path in sorted((CONFIG_DIR / "model").glob("*.yaml")):
        cfg = mythos.load_model_config(path)
        again = from_dict(type(cfg), __import__("yaml").safe_load(dump_yaml(cfg)))
        assert again == cfg, path


def test_model_config_semantic_errors() -> None:
    with pytest.raises(ConfigError, match="not divisible by n_heads"):
        mythos.load_model_config("dense-tiny", ["d_model=250"])
    with pytest.raises(ConfigError, match="kind=dense needs n_layers"):
        mythos.load_model_config("dense-tiny", ["n_layers=0"])
    with pytest.raises(ConfigError, match=r"'loops.schedule'.*'sometimes' is not one of"):
        mythos.load_model_config("rdt-tiny", ["loops.schedule=sometimes"])
    cfg = mythos.load_model_config("rdt-tiny", ["loops.mean=6", "lora.rank=2"])
    assert cfg.loops.mean == 6.0 and cfg.lora.rank == 2
