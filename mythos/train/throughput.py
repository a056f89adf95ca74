"""Throughput bookkeeping: tokens/s, model and hardware TFLOP/s, MFU and HFU per log window.

*Model* FLOPs per token count the RDT at its expected loop count (E[T] forward, E[min(T, k)]
backward): what matching and MFU use. *Hardware* FLOPs per token count what ran: the RDT's
executed iterations per sequence (each step reports them; with active rows they are the sequences'
own T) plus the forwards activation checkpointing recomputes (HFU). See :mod:`mythos.accounting`.
"""

from __future__ import annotations

import numpy as np
import torch

from mythos.accounting import flops_per_token, peak_flops_for_device
from mythos.model.config import ModelConfig


def device_peak_flops(peak_tflops: float, cuda: bool) -> float | None:
    """Peak FLOP/s per device: the configured ``log.peak_tflops``, else the datasheet bf16 peak of
    the CUDA device, else None (no MFU on CPU)."""
    if peak_tflops:
        return peak_tflops * 1e12
    return peak_flops_for_device(torch.cuda.get_device_name()) if cuda else None


class Throughput:
    """Accumulates per-step timings of one log window and turns them into ``perf/*`` metrics.

    ``tokens_per_step`` is the global batch in tokens; rates are per device (``world_size``)."""

    def __init__(self, model_cfg: ModelConfig, seq_len: int, tokens_per_step: int, world_size: int,
                 peak_flops: float | None, meta_model: torch.nn.Module | None = None) -> None:
        self.cfg, self.seq_len = model_cfg, seq_len
        self.tokens_per_step, self.world_size, self.peak_flops = tokens_per_step, world_size, peak_flops
        self._meta = meta_model
        self.model_flops_per_token = float(flops_per_token(model_cfg, seq_len, model=meta_model).total)
        self._hw_cache: dict[tuple[float, float] | None, float] = {}
        self._steps: list[float] = []
        self._waits: list[float] = []
        self._executed: list[tuple[float, float]] = []

    def hardware_flops_per_token(self, executed: tuple[float, float] | None) -> float:
        """FLOPs per token that ran, for executed (forward, backward) loops per sequence (None:
        dense, or the RDT's expectation); includes checkpoint recompute when it is on."""
        key = None if executed is None else (round(executed[0], 3), round(executed[1], 3))
        if key not in self._hw_cache:
            ckpt_on = self.cfg.checkpoint_layers or self.cfg.checkpoint_loops
            self._hw_cache[key] = float(flops_per_token(
                self.cfg, self.seq_len, loops_mean=None if key is None else key[0],
                bwd_loops_mean=None if key is None else key[1], include_recompute=ckpt_on, model=self._meta,
            ).total)
        return self._hw_cache[key]

    def add_step(self, seconds: float, data_wait_s: float, executed: tuple[float, float] | None = None) -> None:
        self._steps.append(seconds)
        self._waits.append(data_wait_s)
        if executed is not None:
            self._executed.append(executed)

    def window_metrics(self) -> dict[str, float]:
        """``perf/*`` of the steps added since the last call (then starts a new window)."""
        step_time = float(np.mean(self._steps))
        tok_s = self.tokens_per_step / step_time
        executed = tuple(np.mean(self._executed, axis=0).tolist()) if self._executed else None
        hw = self.hardware_flops_per_token(executed)  # type: ignore[arg-type]
        per_dev = tok_s / self.world_size
        m = {
            "perf/step_time_s": step_time,
            "perf/data_wait_frac": float(np.sum(self._waits) / max(np.sum(self._steps), 1e-9)),
            "perf/tokens_per_s": tok_s,
            "perf/tokens_per_s_per_device": per_dev,
            "perf/model_tflops_per_device": self.model_flops_per_token * per_dev / 1e12,
            "perf/hardware_tflops_per_device": hw * per_dev / 1e12,
        }
        if self.peak_flops:  # MFU counts model FLOPs; HFU what ran (executed loops, recompute)
            m["perf/mfu"] = self.model_flops_per_token * per_dev / self.peak_flops
            m["perf/hfu"] = hw * per_dev / self.peak_flops
        self._steps, self._waits, self._executed = [], [], []
        return m
