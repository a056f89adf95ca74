"""Device / dtype choice, one-line argparse errors and stderr progress, shared by the eval entry
points (``python -m mythos.eval``, its ``--multihop`` pass and ``mythos.eval.lm_eval_adapter``).

Defaults follow training's ``precision: auto``: ``cuda`` + bf16 when CUDA is available, else
``cpu`` + fp32 (which reproduces the CPU numbers exactly).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from mythos.config import ConfigError

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_ALIASES = {"fp32": "float32", "bf16": "bfloat16"}


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` as a :class:`torch.device` (``None`` = ``cuda`` if available, else ``cpu``)."""
    if device is None or device == "":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"--device must be cpu, cuda or cuda:N, got '{device}'") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device must be cpu, cuda or cuda:N, got '{device}'")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device} requested but CUDA is not available; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``dtype`` as a torch dtype (``None`` = bf16 on CUDA, fp32 on CPU)."""
    if dtype is None or dtype == "":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype}")
        return dtype
    name = _ALIASES.get(str(dtype).lower(), str(dtype).lower())
    if name not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
    return DTYPES[name]


def resolve(device: str | torch.device | None, dtype: str | torch.dtype | None) -> tuple[torch.device, torch.dtype]:
    """``(device, dtype)`` with the defaults above; a :class:`ConfigError` for a bad value."""
    dev = resolve_device(device)
    return dev, resolve_dtype(dtype, dev)


def dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


def add_device_args(p: argparse.ArgumentParser) -> None:
    """``--device``, ``--dtype`` and ``--quiet``; validated later by :func:`resolve` (one-line errors)."""
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


class Progress:
    """``"LABEL: i/n batches"`` lines on stderr: the first batch, then at most every ``every_s``
    seconds, and the end -- a handful of lines per phase, not a bar redrawn per batch."""

    def __init__(self, label: str, total: int, *, quiet: bool = False, every_s: float = 10.0) -> None:
        self.label, self.total, self.quiet, self.every_s = label, total, quiet, every_s
        self.t0 = self.last = time.perf_counter()

    def update(self, done: int) -> None:
        if self.quiet:
            return
        now = time.perf_counter()
        if done == self.total or done == 1 or now - self.last >= self.every_s:
            self.last = now
            end = f" ({now - self.t0:.1f}s)" if done == self.total else ""
            print(f"{self.label}: {done}/{self.total} batches{end}", file=sys.stderr, flush=True)
