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
