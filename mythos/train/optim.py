"""Parameter groups and the learning-rate schedule.

The schedule is a pure function of the optimizer step, applied by setting each group's ``lr``
before the step. Nothing about it needs saving, and a resumed run (any world size) gets exactly
the rates of an uninterrupted one.
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from mythos.model.base import CausalLM
from mythos.train.config import OptimConfig


def param_groups(model: CausalLM, cfg: OptimConfig) -> list[dict[str, Any]]:
    """Groups for the optimizer: decayed matrices, and everything else without weight decay
    (embeddings, norm gains/biases, and the LTI injection/readout, as Parcae prescribes).

    With ``muon`` the parameters also carry ``use_muon`` (2-D matrices only; embeddings and the
    LTI parameters stay on AdamW); :func:`tag_muon` re-applies it after DeepSpeed's own
    name-based tagging.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if model.param_kind(name, p) == "matrix" else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay, "name": "decay"}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "name": "no_decay"})
    return groups


def muon_eligible(model: CausalLM) -> dict[str, bool]:
    """Parameter name -> goes to Muon. Muon orthogonalises 2-D updates, so only true weight
    matrices qualify: not embeddings/head, not the LTI parameters (B, C), not LoRA banks (3-D),
    not vectors."""
    return {name: model.param_kind(name, p) == "matrix" and p.dim() == 2 for name, p in model.named_parameters()}


def lr_multiplier(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    floor = cfg.min_lr_ratio
    if cfg.schedule == "wsd":
        decay_steps = max(int(round(cfg.decay_fraction * total_steps)), 1)
        decay_start = total_steps - decay_steps
        if step < decay_start:
            return 1.0
        frac = min((step - decay_start + 1) / decay_steps, 1.0)
        return 1.0 - (1.0 - floor) * frac
    span = max(total_steps - cfg.warmup_steps, 1)
    frac = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * frac))


def set_lr(optimizer: Any, base_lrs: list[float], mult: float) -> None:
    for group, base in zip(optimizer.param_groups, base_lrs):
        group["lr"] = base * mult


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
