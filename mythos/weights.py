"""Consolidated weights: ``model.safetensors`` (fp32, our parameter names) + ``config.yaml`` (the
resolved :class:`ModelConfig`), for every model kind.

The format ``mythos-export`` writes by default and every reader accepts in place of a DeepSpeed
checkpoint tag (eval, the HF exporters). It round-trips exactly: :func:`load_consolidated` of
:func:`save_consolidated` gives the same tensors. Both files are written atomically (temp file +
rename), the weights first and the config last, so a directory with a config is complete.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from mythos.config import dump_yaml, load_config
from mythos.ds_checkpoint import clean_state_dict
from mythos.io import atomic_write, atomic_write_text
from mythos.model.base import CausalLM
from mythos.model.build import build_model
from mythos.model.config import ModelConfig
from mythos.run_dir import EXPORTED_CONFIG, EXPORTED_WEIGHTS


def save_tensors(path: Path, tensors: Mapping[str, Tensor], dtype: torch.dtype) -> None:
    """``tensors`` cast to ``dtype`` as safetensors at ``path`` (atomic, mode like its siblings).

    safetensors refuses tensors that share storage (e.g. views into ZeRO's flat fp32 buffer), so
    each is cast/copied into its own contiguous CPU tensor."""
    out = {}
    for name, t in tensors.items():
        t = t.detach().to("cpu", dtype)
        shared = t.untyped_storage().nbytes() != t.numel() * t.element_size()
        out[name] = t.clone() if shared or not t.is_contiguous() else t

    def write(p: Path) -> None:
        # atomic_write gave the temp file the usual mode; save_file replaces it with its own 0600
        # file, so the mode is put back (the exported directory is meant to be shared)
        mode = p.stat().st_mode & 0o777
        save_file(out, str(p), metadata={"format": "pt"})
        os.chmod(p, mode)

    atomic_write(path, write)


def matching_state_dict(state_dict: Mapping[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """``state_dict`` with wrapper prefixes stripped; ``ValueError`` (one line) unless its keys are
    exactly those of ``cfg``'s model (no silent drops, nothing extra), so a mismatched config
    fails when weights are written rather than when they are loaded."""
    sd = clean_state_dict(state_dict)
    expected = set(build_model(cfg, device="meta").state_dict())
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise ValueError(f"state dict does not match the {cfg.kind} config: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    return sd


def save_consolidated(model_or_state_dict: nn.Module | Mapping[str, Tensor], cfg: ModelConfig,
                      out_dir: str | Path) -> Path:
    """Write ``model.safetensors`` (fp32, wrapper prefixes stripped) and ``config.yaml`` (the
    resolved ``cfg``) to ``out_dir``; returns it. The keys must match ``cfg``'s model
    (:func:`matching_state_dict`)."""
    sd = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else model_or_state_dict
    sd = matching_state_dict(sd, cfg)
    out = Path(out_dir)
    save_tensors(out / EXPORTED_WEIGHTS, sd, torch.float32)
    atomic_write_text(out / EXPORTED_CONFIG, dump_yaml(cfg))
    return out


def load_config_of(path: str | Path) -> ModelConfig:
    """The model config of a consolidated directory ``path`` (strict, like every config load)."""
    return load_config(ModelConfig, Path(path) / EXPORTED_CONFIG)


def load_consolidated(path: str | Path, *, device: str | torch.device = "cpu") -> CausalLM:
    """Rebuild the model saved by :func:`save_consolidated` (fp32, strict key match)."""
    path = Path(path)
    cfg = load_config_of(path)
    with torch.device(device):
        model = build_model(cfg)
    model.load_state_dict(load_file(str(path / EXPORTED_WEIGHTS), device=str(device)), strict=True)
    return model
