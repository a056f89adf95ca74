"""``build_model(cfg)``: the one place that maps a :class:`ModelConfig` to a module."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from mythos.config import load_config
from mythos.model.base import CausalLM
from mythos.model.config import ModelConfig


def load_model_config(path: str | Path, overrides: Sequence[str] = ()) -> ModelConfig:
    """Load a model YAML (a path, or a preset name such as ``rdt-tiny`` from ``configs/model/``)
    with dotted overrides like ``("d_model=256", "loops.mean=4")``."""
    return load_config(ModelConfig, path, overrides, kind="model")


def build_model(cfg: ModelConfig, *, device: str | torch.device | None = None) -> CausalLM:
    """An initialised ``DenseLM`` or ``RDT`` (fp32). ``device="meta"`` builds without memory,
    for parameter counting."""
    from mythos.model.dense import DenseLM
    from mythos.model.rdt import RDT

    cls = DenseLM if cfg.kind == "dense" else RDT
    if device is None:
        return cls(cfg)
    with torch.device(device):
        return cls(cfg)
