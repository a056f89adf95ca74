"""Load a trained run for evaluation: its resolved config plus a consolidated checkpoint.

A run directory (written by :class:`mythos.train.trainer.Trainer`) holds ``config.resolved.yaml``,
``run_info.json`` and ``checkpoints/stepNNNNNNN/`` DeepSpeed tag directories with a ``COMPLETE``
marker. :func:`load_run` merges the (possibly ZeRO-partitioned) fp32 master weights with
:func:`mythos.export.consolidate_deepspeed` -- the same path as ``python -m mythos.export`` -- and
builds the model on one device in eval mode. A directory written by ``python -m mythos.export``
(``model.safetensors`` + ``config.yaml``) also works as ``--checkpoint``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mythos import cli_common
from mythos.config import ConfigError
from mythos.model.base import CausalLM
from mythos.train.config import RunConfig, load_run_config

RESOLVED_CONFIG = "config.resolved.yaml"


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


def resolve_checkpoint(run_dir: Path, tag: str | None) -> tuple[Path, int]:
    """``(directory, step)`` of checkpoint ``tag`` (``None``/``latest`` = newest complete one, a tag
    name, or a path): :func:`mythos.cli_common.resolve_checkpoint`, shared by every tool."""
    return cli_common.resolve_checkpoint(run_dir, tag)


def load_run(
    run_dir: str | Path,
    checkpoint: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> LoadedRun:
    """Config + model of ``run_dir`` at ``checkpoint`` (default: the newest complete one), built
    on ``device`` from the fp32 master weights and then cast to ``dtype`` (as training's bf16 does)."""
    from mythos.export import consolidate_deepspeed, load_consolidated
    from mythos.model import build_model

    run_dir = Path(run_dir)
    cfg = load_run_config_from_dir(run_dir)
    path, step = resolve_checkpoint(run_dir, checkpoint)
    if (path / "model.safetensors").is_file():
        model = load_consolidated(path, device=device)
    else:
        state = consolidate_deepspeed(path)
        with torch.device(device):
            model = build_model(cfg.model)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ConfigError(
                f"checkpoint {path} does not match {run_dir / RESOLVED_CONFIG}'s model (missing {missing[:3]}, "
                f"unexpected {unexpected[:3]})"
            )
    model.to(dtype=dtype).eval()
    info_path = run_dir / "run_info.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    return LoadedRun(run_dir, cfg, model, path.name if step >= 0 else str(path), step, info)
