"""Load a trained run for evaluation: its resolved config plus a consolidated checkpoint.

A run directory (written by :class:`mythos.train.trainer.Trainer`) holds ``config.resolved.yaml``,
``run_info.json`` and ``checkpoints/stepNNNNNNN/`` DeepSpeed tag directories with a ``COMPLETE``
marker. :func:`load_run` merges the (possibly ZeRO-partitioned) fp32 master weights with
:func:`mythos.ds_checkpoint.consolidate_deepspeed` -- the same path as ``mythos-export`` -- and
builds the model on one device in eval mode. A directory written by ``mythos-export``
(``model.safetensors`` + ``config.yaml``) also works as ``--checkpoint``.

The model is always the *run's*: a checkpoint whose weights or exported config describe another
model (an RDT export handed to a dense run) is refused in one line, so results are never written
into, and reported as, a run that did not produce them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mythos import cli_common
from mythos.config import ConfigError, to_dict
from mythos.ds_checkpoint import consolidate_deepspeed
from mythos.model.base import CausalLM
from mythos.model.build import build_model
from mythos.model.config import ModelConfig
from mythos.run_dir import RESOLVED_CONFIG, RUN_INFO, read_marker
from mythos.train.config import RunConfig, load_run_config
from mythos.train.provenance import section_hash
from mythos.weights import load_config_of, load_consolidated


@dataclass
class LoadedRun:
    """A run's config and model (eval mode, on the requested device / dtype) at one checkpoint."""

    run_dir: Path
    cfg: RunConfig
    model: CausalLM
    checkpoint: str
    """Tag (``step0000200``) or the path of an exported model directory."""
    step: int
    info: dict[str, Any] = field(default_factory=dict)
    """``run_info.json`` (empty if missing)."""


def load_run_config_from_dir(run_dir: str | Path) -> RunConfig:
    path = Path(run_dir) / RESOLVED_CONFIG
    if not path.is_file():
        raise ConfigError(f"{path} not found: --run must be a training run directory (written by launch/pretrain.py)")
    return load_run_config(path)


def _leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"loops.mean": 8, ...}`` for a nested dict (the config keys a user would type)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    return {k: v for key, sub in tree.items() for k, v in _leaves(sub, f"{prefix}.{key}" if prefix else key).items()}


def check_same_model(run_model: ModelConfig, other: ModelConfig, checkpoint: Path, run_dir: Path) -> None:
    """One-line :class:`ConfigError` naming the first differing ``model.*`` key when the checkpoint's
    model config is not the run's."""
    mine, theirs = _leaves(to_dict(run_model)), _leaves(to_dict(other))
    diff = [k for k in sorted(mine.keys() | theirs.keys()) if mine.get(k) != theirs.get(k)]
    if diff:
        k = diff[0]
        more = f" and {len(diff) - 1} more" if len(diff) > 1 else ""
        raise ConfigError(f"checkpoint {checkpoint} is not a checkpoint of {run_dir} (model.{k}: {theirs.get(k)!r} "
                          f"there, {mine.get(k)!r} in the run{more}); pass --run the run it came from")


def _check_shapes(model: torch.nn.Module, state: dict[str, torch.Tensor], checkpoint: Path, run_dir: Path) -> None:
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing, unexpected = sorted(want.keys() - state.keys()), sorted(state.keys() - want.keys())
    if missing or unexpected:
        raise ConfigError(f"checkpoint {checkpoint} does not match {run_dir / RESOLVED_CONFIG}'s model (missing "
                          f"{missing[:3]}, unexpected {unexpected[:3]}); pass --run the run it came from")
    bad = [k for k in want if tuple(state[k].shape) != want[k]]
    if bad:
        raise ConfigError(f"checkpoint {checkpoint} does not match {run_dir / RESOLVED_CONFIG}'s model ({bad[0]}: "
                          f"{tuple(state[bad[0]].shape)} there, {want[bad[0]]} in the run); pass --run the run it "
                          "came from")


def load_run(
    run_dir: str | Path,
    checkpoint: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> LoadedRun:
    """Config + model of ``run_dir`` at ``checkpoint`` (default: the newest complete one), built
    on ``device`` from the fp32 master weights and then cast to ``dtype`` (as training's bf16 does)."""
    run_dir = Path(run_dir)
    cfg = load_run_config_from_dir(run_dir)
    path, step = cli_common.resolve_checkpoint(run_dir, checkpoint)
    if (path / cli_common.EXPORTED_WEIGHTS).is_file():
        check_same_model(cfg.model, load_config_of(path), path, run_dir)
        model = load_consolidated(path, device=device)
    else:
        # the COMPLETE marker names the model that wrote the tag: refuse before merging any shard
        written_by = (read_marker(path) or {}).get("model_hash")
        if written_by is not None and written_by != section_hash(cfg.model):
            raise ConfigError(f"checkpoint {path} does not match {run_dir / RESOLVED_CONFIG}'s model (written by model "
                              f"{written_by}, the run's is {section_hash(cfg.model)}); pass --run the run it came from")
        state = consolidate_deepspeed(path)
        with torch.device(device):
            model = build_model(cfg.model)
        _check_shapes(model, state, path, run_dir)
        model.load_state_dict(state, strict=True)
    model.to(dtype=dtype).eval()
    info_path = run_dir / RUN_INFO
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    return LoadedRun(run_dir, cfg, model, path.name if step >= 0 else str(path), step, info)
