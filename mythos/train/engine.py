"""DeepSpeed engine construction: the model, its optimiser parameter groups and the derived
DeepSpeed config in, an initialised engine out.

The one non-obvious step is Muon. DeepSpeed tags ``use_muon`` by parameter *name* (2-D and not
"embed"/"lm_head"), which would put the LTI injection's B and readout C, and the 3-D LoRA banks,
on Muon. Parcae keeps them on AdamW, so :func:`build_engine` re-tags right after DeepSpeed's pass,
before it builds the optimizer (``tests/unit/test_optim.py`` pins which parameters land where).
"""

from __future__ import annotations

from typing import Any

import torch

from mythos.train.config import OptimConfig
from mythos.train.optim import muon_eligible, param_groups


def build_engine(model: torch.nn.Module, optim: OptimConfig, ds_config: dict[str, Any]) -> Any:
    """``deepspeed.initialize`` with our parameter groups (and Muon's re-tag); returns the engine."""
    import deepspeed

    groups = param_groups(model, optim)
    if optim.name != "muon":
        engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config)
        return engine
    eligible = muon_eligible(model)
    original = deepspeed.set_optimizer_flags

    def retag(config_class: Any, module: torch.nn.Module) -> None:
        original(config_class, module)
        for name, p in module.named_parameters():
            p.use_muon = eligible.get(name, False)

    deepspeed.set_optimizer_flags = retag  # only for the duration of initialize
    try:
        engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config)
    finally:
        deepspeed.set_optimizer_flags = original
    return engine


def step_without_update(engine: Any) -> None:
    """ZeRO-0 has no ZeRO optimizer to skip a non-finite (or spike-flagged) step for us: drop the
    gradients (torch's optimizers skip parameters without one) and step with clipping off for this
    call -- DeepSpeed's fp32 clipping takes its device from the first parameter that has a gradient
    and fails when none has. The engine's step counters still advance, as on a good step."""
    for p in engine.module.parameters():
        p.grad = None
    clip = engine._config.gradient_clipping
    engine._config.gradient_clipping = 0.0
    try:
        engine.step()
    finally:
        engine._config.gradient_clipping = clip


def to_device(t: torch.Tensor, device: torch.device, cuda: bool) -> torch.Tensor:
    """Host batch tensor -> device without a host sync (CUDA: via pinned memory, non-blocking;
    the loader's workers pin already when ``data.pin_memory``)."""
    if cuda and not t.is_pinned():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)
