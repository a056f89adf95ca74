"""Generate the DeepSpeed config from the run config.

The file named by ``deepspeed.config`` holds only DeepSpeed's own engine settings (ZeRO stage,
buckets, offload). Batch arithmetic, precision, clipping and the optimizer are *derived* here
from the run config, so there is exactly one place that states each of them (the
hand-maintained second JSON that drifts from the training script is a classic failure).
Setting one of the derived keys in the DeepSpeed file is an error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mythos.config import ConfigError, load_yaml, resolve_config_path
from mythos.train.config import RunConfig

DERIVED_KEYS = (
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
    "gradient_clipping", "optimizer", "scheduler", "bf16", "fp16",
)


def load_ds_file(ref: str) -> dict[str, Any]:
    path = resolve_config_path(ref, kind="deepspeed")
    raw = json.loads(path.read_text()) if path.suffix == ".json" else load_yaml(path)
    clash = [k for k in DERIVED_KEYS if k in raw]
    if clash:
        raise ConfigError(
            f"{path}: '{clash[0]}' is derived from the run config (train:/optim:/deepspeed.precision); remove it"
        )
    return raw


def use_bf16(cfg: RunConfig, cuda: bool) -> bool:
    p = cfg.deepspeed.precision
    return p == "bf16" or (p == "auto" and cuda)


def build_ds_config(cfg: RunConfig, world_size: int, cuda: bool, load_universal: bool = False) -> dict[str, Any]:
    """The complete DeepSpeed config dict for ``deepspeed.initialize(config=...)``.
    ``load_universal``: the run resumes from a universal checkpoint (another world size wrote it;
    see :mod:`mythos.train.reshard`)."""
    t, o = cfg.train, cfg.optim
    ds = load_ds_file(cfg.deepspeed.config)
    accum = t.global_batch_size // (t.micro_batch_size * world_size)
    ds.update(
        train_batch_size=t.global_batch_size,
        train_micro_batch_size_per_gpu=t.micro_batch_size,
        gradient_accumulation_steps=accum,
        gradient_clipping=o.grad_clip,
    )
    if load_universal:
        ds["checkpoint"] = {**ds.get("checkpoint", {}), "load_universal": True}
    if use_bf16(cfg, cuda):
        # check_grad_overflow: skip the update when the gradient norm is non-finite (DeepSpeed
        # does this by default in fp32 and fp16, not in bf16 ZeRO-1/2).
        ds["bf16"] = {"enabled": True, "check_grad_overflow": True}
    torch_adam = o.impl == "torch" or (o.impl == "auto" and not cuda)
    if o.name == "adamw":
        params: dict[str, Any] = {"lr": o.lr, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay}
        if torch_adam:
            params["torch_adam"] = True
        ds["optimizer"] = {"type": "AdamW", "params": params}
    else:
        params = {
            "lr": o.lr, "muon_lr": o.muon_lr, "adam_lr": o.lr, "momentum": o.muon_momentum,
            "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay,
        }
        if torch_adam:
            params["torch_adam"] = True
        ds["optimizer"] = {"type": "Muon", "params": params}
    return ds


def write_ds_config(ds: dict[str, Any], path: Path) -> None:
    from mythos.io import atomic_write_text

    atomic_write_text(path, json.dumps(ds, indent=2, sort_keys=True) + "\n")
