"""Loop-count sampling for RDT training.

The loop counts of the *whole global batch* are a pure function of ``(seed, step)``: every rank
draws the same vector and reads its samples' counts by their global positions, so a sample's T
depends neither on the world size nor on which rank runs it, and a resumed run redraws exactly the
same counts. Which rank and micro-batch runs which position, and how many iterations a
micro-batch runs (ZeRO-3 needs equal core calls on every rank), is decided by
:mod:`mythos.train.loop_layout`.
"""

from __future__ import annotations

import math

import torch

from mythos.model.config import LoopConfig

_STEP_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: decorrelates consecutive step seeds


def _generator(seed: int, step: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + step * _STEP_MIX) % (2**63 - 1))
    return g


def sample_loop_counts(cfg: LoopConfig, seed: int, step: int, global_batch: int,
                       hops: torch.Tensor | None = None) -> torch.Tensor:
    """Loop counts ``T [global_batch]`` (int64, in ``[1, cfg.max_loops]``) for one training step.

    - ``poisson`` (Parcae): per sequence ``T_i = max(Poisson(mean), 1)``;
    - ``lognormal_poisson`` (Huginn): one ``T = Poisson(exp(tau)) + 1`` per batch with
      ``tau ~ N(log(mean) - sigma^2/2, sigma)`` (so ``E[T] ~= mean + 1``);
    - ``fixed``: ``mean`` for every sequence;
    - ``uniform``: per sequence ``T_i ~ U{min_loops, ..., max_loops}`` (independent of the data);
    - ``hops``: ``T_i = hops_i + hops_offset`` from the samples' hop counts ``hops [global_batch]``
      (a function of the sample, hence of the global position through the data order).
    """
    if cfg.schedule == "hops":
        if hops is None:
            raise ValueError("loops.schedule=hops needs every sample's hop count: train on task shards "
                             "that record sample_hops (python -m mythos.tasks), or pass loop_counts")
        h = torch.as_tensor(hops, dtype=torch.long)
        if h.shape != (global_batch,):
            raise ValueError(f"hops must have shape [{global_batch}], got {tuple(h.shape)}")
        return (h + cfg.hops_offset).clamp(1, cfg.max_loops)
    if cfg.schedule == "fixed":
        return torch.full((global_batch,), int(cfg.mean), dtype=torch.long)
    g = _generator(seed, step)
    if cfg.schedule == "uniform":
        return torch.randint(cfg.min_loops, cfg.max_loops + 1, (global_batch,), generator=g)
    if cfg.schedule == "poisson":
        t = torch.poisson(torch.full((global_batch,), float(cfg.mean)), generator=g).long()
        return t.clamp(1, cfg.max_loops)
    mu = math.log(cfg.mean) - cfg.lognormal_sigma**2 / 2
    tau = torch.normal(mu, cfg.lognormal_sigma, (1,), generator=g)
    t = torch.poisson(tau.exp(), generator=g).long() + 1
    return t.clamp(1, cfg.max_loops).expand(global_batch).clone()


def expected_loops(cfg: LoopConfig, samples: int = 200_000) -> tuple[float, float]:
    """``(E[T], E[min(T, bwd_depth)])`` under the schedule (Monte Carlo, fixed seed), for FLOPs
    accounting. ``bwd_depth = 0`` means full backprop, so ``E[k] = E[T]``. With ``schedule=hops`` T
    depends on the data, so ``mean`` stands for ``E[T]`` (set it to the task's mean hops + offset)."""
    if cfg.schedule == "hops":
        return float(cfg.mean), float(cfg.mean if cfg.bwd_depth == 0 else min(cfg.mean, cfg.bwd_depth))
    t = sample_loop_counts(cfg, seed=1234, step=0, global_batch=samples).double()
    if cfg.schedule == "lognormal_poisson":  # one draw per batch: average over many batches
        t = torch.cat([sample_loop_counts(cfg, 1234, s, 1).double() for s in range(20_000)])
    k = t if cfg.bwd_depth == 0 else t.clamp(max=cfg.bwd_depth)
    return float(t.mean()), float(k.mean())


def executed_loops(cfg: LoopConfig, counts: torch.Tensor) -> tuple[float, float]:
    """``(forward, backward)`` core iterations per sequence that the RDT executes for a batch
    with loop counts ``counts``: ``mean T`` and ``mean min(T, bwd_depth)`` with
    ``execution=active``; the batch max for every row with ``masked``. (Zero-row calls that keep
    ZeRO-3 ranks in step cost no FLOPs and are not counted.)"""
    t = counts.double()
    if cfg.execution == "masked":
        t = t.max().expand(t.numel())
    k = t if cfg.bwd_depth == 0 else t.clamp(max=cfg.bwd_depth)
    return float(t.mean()), float(k.mean())
