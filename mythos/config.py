"""One config system: typed dataclasses loaded from YAML, with dotted CLI overrides.

Every config in the project (model, data, training, run) is a dataclass. This module turns
YAML into those dataclasses *strictly*:

- unknown keys are rejected (a typo must never silently fall back to a default: a matched
  comparison is only valid if both arms run what their files say);
- values are type-checked against the annotations (``int`` accepts only ints, ``float`` accepts
  ints, ``bool`` only booleans, ``Literal`` only its members, nested dataclasses recursively);
- a nested dataclass section may be given as a path string or as ``{include: path, ...}``,
  which loads that YAML file first and applies the remaining keys on top (so run configs can
  share one ``data`` file and override single model fields);
- CLI overrides ``a.b.c=value`` are parsed as YAML scalars and applied to the raw tree before
  validation, so they obey the same checks.

Errors are :class:`ConfigError` with a one-line message naming the key and the file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

#: Repository root of a checkout (repo-relative data paths such as ``data/demo/shards`` resolve
#: here too); in an installed wheel it is site-packages, where those paths simply do not exist.
REPO_ROOT = Path(__file__).resolve().parents[1]
#: The presets ship inside the package (wheel package data), so preset names and the
#: ``configs/...`` paths that configs name resolve from any directory, installed or not; the
#: checkout's top-level ``configs`` is a symlink to this directory.
CONFIG_DIR = Path(__file__).resolve().parent / "configs"

INCLUDE_KEY = "include"


class ConfigError(ValueError):
    """A bad config: the message is one line naming the key, the file and what to do."""


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing file or non-mapping top level is a :class:`ConfigError`."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p} (check the path or preset name)")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" line {line + 1}" if line is not None else ""
        raise ConfigError(f"{p}{where}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping of keys, got {type(data).__name__}")
    return data


def resolve_config_path(ref: str | Path, base_dir: Path | None = None, kind: str | None = None) -> Path:
    """Find a config file: an existing path (absolute, relative to ``base_dir`` or to the cwd),
    or a preset name such as ``rdt-tiny`` looked up in ``configs/<kind>/``."""
    ref_p = Path(ref)
    candidates = [ref_p] if ref_p.is_absolute() else []
    if not ref_p.is_absolute():
        if base_dir is not None:
            candidates.append(base_dir / ref_p)
        candidates += [Path.cwd() / ref_p, REPO_ROOT / ref_p]
        if ref_p.parts[0] == CONFIG_DIR.name:  # "configs/run/x.yaml": the shipped preset, from any cwd
            candidates.append(CONFIG_DIR.joinpath(*ref_p.parts[1:]))
        if kind is not None:
            name = ref_p.name if ref_p.suffix in (".yaml", ".yml") else ref_p.name + ".yaml"
            candidates.append(CONFIG_DIR / kind / name)
    for c in candidates:
        if c.is_file():
            return c.resolve()
    tried = list(dict.fromkeys(str(c) for c in candidates))  # the cwd is often the repo root: once each
    raise ConfigError(f"config not found: '{ref}' (tried {', '.join(tried)})")


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"train.lr=3e-4"`` -> (["train", "lr"], 0.0003). Values are YAML scalars/flow collections."""
    item = item.removeprefix("--")
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key.sub=value")
    key, _, raw = item.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{item}': empty key segment")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # not valid YAML (e.g. an unquoted path with ':'), keep the string
    # YAML 1.1 reads "1e-3" as a string; accept scientific notation as float like Python does.
    if isinstance(value, str) and any(ch in value.lower() for ch in "e."):
        with contextlib.suppress(ValueError):
            value = float(value)
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply dotted overrides to a raw (not yet validated) config tree, in place; returns it."""
    for item in overrides:
        keys, value = parse_override(item)
        node = raw
        for k in keys[:-1]:
            nxt = node.get(k)
            if nxt is None:
                nxt = node[k] = {}
            elif isinstance(nxt, str):  # a section given as an include path: keep it, add on top
                nxt = node[k] = {INCLUDE_KEY: nxt}
            elif not isinstance(nxt, dict):
                raise ConfigError(f"override '{item}': '{k}' is a value, not a section")
            node = nxt
        node[keys[-1]] = value
    return raw


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str, src: str, base_dir: Path | None) -> Any:
    """Check ``value`` against annotation ``tp`` and convert it (nested dataclasses, tuples)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, key, src, base_dir)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"config key '{key}'{src}: {value!r} does not match {_type_name(tp)}")
    if origin is typing.Literal:
        if value in args:
            return value
        allowed = ", ".join(repr(a) for a in args)
        raise ConfigError(f"config key '{key}'{src}: {value!r} is not one of {allowed}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, src, base_dir)
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}'{src}: expected a list, got {value!r}")
        item_tp = args[0] if args else Any
        items = [_convert(v, item_tp, f"{key}[{i}]", src, base_dir) for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}'{src}: expected a mapping, got {value!r}")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _convert(v, vt, f"{key}.{k}", src, base_dir) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
            return int(value)  # allow 1e6 for an int count
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(
        f"config key '{key}'{src}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}"
    )


def _expand_include(value: Any, key: str, base_dir: Path | None) -> tuple[dict, Path | None, str]:
    """A section may be a path string or ``{include: path, **overrides}``; merge and return
    (mapping, directory for nested relative includes, source description)."""
    if isinstance(value, str):
        value = {INCLUDE_KEY: value}
    if not isinstance(value, dict):
        raise ConfigError(f"config key '{key}': expected a mapping or an include path, got {value!r}")
    if INCLUDE_KEY not in value:
        return value, base_dir, ""
    ref = value[INCLUDE_KEY]
    if not isinstance(ref, str):
        raise ConfigError(f"config key '{key}.{INCLUDE_KEY}': expected a path string, got {ref!r}")
    kind = key.split(".")[-1] if key else None
    path = resolve_config_path(ref, base_dir, kind=kind)
    merged = _deep_merge(load_yaml(path), {k: v for k, v in value.items() if k != INCLUDE_KEY})
    # the included file may itself include a base (e.g. a preset built on another preset)
    if INCLUDE_KEY in merged:
        inner, _, _ = _expand_include(merged, key, path.parent)
        merged = inner
    return merged, path.parent, f" (from {path.name})"


def _deep_merge(base: dict, top: Mapping) -> dict:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict) and INCLUDE_KEY not in v:
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _build(cls: type[T], value: Any, prefix: str, src: str, base_dir: Path | None) -> T:
    data, base_dir, inc_src = _expand_include(value, prefix, base_dir)
    src = inc_src or src
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown config key '{where}{unknown[0]}'{src}; valid keys: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, val in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _convert(val, hints[name], key, src, base_dir)
    try:
        obj = cls(**kwargs)
    except TypeError as exc:  # a required field without a value
        raise ConfigError(f"config section '{prefix or cls.__name__}'{src}: {exc}") from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError:
            raise
        except ValueError as exc:
            raise ConfigError(f"config '{prefix or cls.__name__}'{src}: {exc}") from None
    return obj


def from_dict(cls: type[T], data: Mapping[str, Any], *, source: str | Path | None = None) -> T:
    """Build dataclass ``cls`` from a raw mapping, strictly (unknown keys / bad types raise)."""
    base_dir = Path(source).parent if source is not None else None
    src = f" (in {source})" if source is not None else ""
    return _build(cls, dict(data), "", src, base_dir)


def check_override_key(cls: type, item: str) -> None:
    """Refuse an override whose key is not a field of ``cls`` (descending through nested
    dataclasses; a mapping-typed field takes any sub-key), naming the override itself: a typo on
    the command line is not the YAML file's fault."""
    keys, _ = parse_override(item)
    tp: Any = cls
    for depth, k in enumerate(keys):
        if not (isinstance(tp, type) and dataclasses.is_dataclass(tp)):
            return  # a dict / Any field: free-form below here
        fields = {f.name for f in dataclasses.fields(tp) if f.init}
        if k not in fields:
            where = ".".join(keys[: depth + 1])
            section = f" of {'.'.join(keys[:depth])}" if depth else ""
            raise ConfigError(f"unknown config key '{where}' in the command-line override '{item.removeprefix('--')}'; "
                              f"valid keys{section}: {', '.join(sorted(fields))}")
        hint = typing.get_type_hints(tp)[k]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        tp = args[0] if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1 else hint


def load_config(cls: type[T], path: str | Path, overrides: Sequence[str] = (), kind: str | None = None) -> T:
    """Load ``path`` (a YAML file or preset name under ``configs/<kind>/``) into ``cls``,
    applying dotted ``overrides`` first. An error in an override's key or value names the
    override, not the file."""
    p = resolve_config_path(path, kind=kind)
    for item in overrides:
        check_override_key(cls, item)
    raw = apply_overrides(load_yaml(p), overrides)
    if INCLUDE_KEY in raw:
        raw, _, _ = _expand_include(raw, "", p.parent)
    try:
        return from_dict(cls, raw, source=p)
    except ConfigError as exc:
        msg = str(exc)
        for item in reversed(overrides):  # the last override of a key is the one that counts
            key = item.removeprefix("--").partition("=")[0].strip()
            if f"config key '{key}'" in msg or f"config key '{key}[" in msg:
                here = f" (from the command-line override '{item.removeprefix('--')}')"
                raise ConfigError(re.sub(r" \((?:in|from) [^)]*\)", here.replace("\\", r"\\"), msg, count=1)) from None
        raise


def to_dict(obj: Any) -> Any:
    """Dataclass tree -> plain dicts/lists (for YAML/JSON dumps and hashing)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def dump_yaml(obj: Any) -> str:
    """Resolved config as YAML text (stable key order = field order)."""
    return yaml.safe_dump(to_dict(obj), sort_keys=False)
