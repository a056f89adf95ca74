"""Per-forward state of the RDT's loop (:mod:`mythos.model.rdt`), shared by its executions.

- :class:`Loop`: what every iteration reads (injection context, value embeddings, cache, the
  truncated-backprop boundary) and the accumulators below.
- :class:`ACTState`: the ACT accumulators per position.
- :class:`LoopStats`: what ran -- core calls, row-iterations forward and with autograd (HFU),
  the MoE balance loss of each call.
- :class:`Exits`: the adaptive exit's working set and each row's exit record.
- :func:`ponder_cost`: ACT's ponder cost and its metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from mythos.model.config import ModelConfig
from mythos.model.layers import KVCache
from mythos.model.rows import RowsCache, take_rows


class ACTState:
    """Running ACT accumulators for positions ``[B, S]`` (fp32)."""

    def __init__(self, h: Tensor) -> None:
        b, s, _ = h.shape
        self.cum = h.new_zeros(b, s, dtype=torch.float32)
        self.remainder = h.new_zeros(b, s, dtype=torch.float32)
        self.n_updates = h.new_zeros(b, s, dtype=torch.float32)
        self.running = torch.ones(b, s, dtype=torch.bool, device=h.device)
        self.output = torch.zeros_like(h)

    def update(self, p: Tensor, h_new: Tensor, active: Tensor, last: bool, threshold: float) -> Tensor:
        """Fold iteration state ``h_new`` in with halting probs ``p [B,S]``; returns the mask of
        positions that ran this iteration (to freeze the others)."""
        run = self.running & active
        halt = run & ((self.cum + p >= threshold) | last)
        cont = run & ~halt
        w = torch.where(halt, 1.0 - self.cum, torch.where(cont, p, torch.zeros_like(p)))
        self.output = self.output + w.unsqueeze(-1).to(h_new.dtype) * h_new
        self.remainder = torch.where(halt, 1.0 - self.cum, self.remainder)
        self.cum = self.cum + torch.where(cont, p, torch.zeros_like(p))
        self.n_updates = self.n_updates + run.float()
        self.running = self.running & ~halt
        return run

    def output_if_last(self, h_new: Tensor) -> Tensor:
        """``[B, S, d]``: the output were this iteration (state ``h_new``) the last one -- the
        positions still running take the forced remainder ``1 - cum`` of ``h_new``."""
        left = torch.where(self.running, 1.0 - self.cum, torch.zeros_like(self.cum))
        return self.output + left.unsqueeze(-1).to(h_new.dtype) * h_new

    def take(self, keep: Tensor) -> None:
        """Keep the rows ``keep [B]`` (bool) only: the adaptive exit drops the rows that exited."""
        for name in ("cum", "remainder", "n_updates", "running", "output"):
            setattr(self, name, getattr(self, name)[keep])


@dataclass
class LoopStats:
    """What one forward's loop ran: core calls (``ran``), row-iterations computed (``rows``) and
    computed with autograd (``tracked_rows``) -- the hardware's work, for HFU -- and each core
    call's MoE balance loss with the rows it ran on (``moe``)."""

    batch: int
    ran: int = 0
    rows: int = 0
    tracked_rows: int = 0
    moe: list[tuple[Tensor, int]] = field(default_factory=list)

    def record(self, rows: int, tracked: bool, moe_aux: Tensor | None) -> None:
        """One core call on ``rows`` rows, with autograd or not, and its MoE balance loss (or None)."""
        self.ran += 1
        self.rows += rows
        self.tracked_rows += rows if tracked else 0
        if moe_aux is not None:
            self.moe.append((moe_aux, rows))

    def aux(self, loops_mean: Tensor) -> dict[str, Tensor]:
        """The loop metrics: iterations run, mean loop count, core iterations per sequence
        computed forward and with autograd (with active rows the sequences' own T and
        ``min(T, bwd_depth)``)."""
        return {"loops_run": torch.tensor(float(self.ran)), "loops_mean": loops_mean,
                "loops_executed": torch.tensor(self.rows / self.batch),
                "bwd_loops_executed": torch.tensor(self.tracked_rows / self.batch)}

    def add_moe_balance(self, cfg: ModelConfig, aux_loss: Tensor | None, aux: dict[str, Tensor]) -> Tensor | None:
        """``aux_loss`` plus the MoE balance term of the core calls; records ``aux["moe_balance"]``.
        A call's balance loss is a mean over the rows it ran, so calls are weighted by rows.
        Unchanged without MoE calls."""
        if not self.moe:
            return aux_loss
        total = sum(r for _, r in self.moe)
        balance = sum(a * (r / total) for a, r in self.moe if r) / cfg.n_core
        term = cfg.moe.balance_weight * balance
        aux["moe_balance"] = balance.detach()
        return term if aux_loss is None else aux_loss + term


@dataclass
class Loop:
    """One forward's loop: what every iteration reads, and what it accumulates.

    ``ctx``: the injection context of the prelude output ``e [B, S, d]``; ``ve``: the core blocks'
    value embeddings (``[B, S, kv_dim]`` or None each) -- both of the rows the loop holds (the
    adaptive exit compacts them as rows exit). ``cache``: what the core blocks see (a
    :class:`RowsCache` view in the adaptive exit). ``n``: iterations to run; iterations
    ``t >= grad_from`` run with autograd when it was on at the trunk's entry (``grad``)."""

    ctx: object
    ve: list[Tensor | None]
    rope: tuple[Tensor, Tensor]
    cache: KVCache | RowsCache | None
    n: int
    grad: bool
    grad_from: int
    act: ACTState | None
    stats: LoopStats

    def tracked(self, t: int) -> bool:
        """Whether iteration ``t`` runs with autograd (truncated backprop)."""
        return self.grad and t >= self.grad_from

    def take(self, keep: Tensor) -> None:
        """Keep the rows ``keep`` (bool over the rows held) of the per-row state."""
        self.ctx = take_rows(self.ctx, keep)
        self.ve = [None if v is None else v[keep] for v in self.ve]
        if self.act is not None:
            self.act.take(keep)


class Exits:
    """The adaptive exit's rows. ``idx [a]``: original indices of the rows still looping (the
    working set); per original row: exit iteration ``exit_t [B]`` (CPU), the state read out
    ``out [B, S, d]``, ACT steps and remainder ``[B, S]``; ``evals``: KL readouts run."""

    def __init__(self, h: Tensor, n: int) -> None:
        b, s, _ = h.shape
        self.idx = torch.arange(b, device=h.device)
        self.out = torch.empty_like(h)
        self.exit_t = torch.full((b,), n, dtype=torch.long)
        self.act_steps = torch.zeros(b, s, dtype=torch.float32, device=h.device)
        self.act_rem = torch.zeros(b, s, dtype=torch.float32, device=h.device)
        self.evals = 0

    def retire(self, done: Tensor, state: Tensor, t: int, act: ACTState | None) -> None:
        """The working rows ``done [a]`` (bool) exit after iteration ``t`` with ``state [a, S, d]``."""
        gone = self.idx[done]
        self.out[gone] = state[done]
        self.exit_t[gone.cpu()] = t + 1
        if act is not None:
            self.act_steps[gone], self.act_rem[gone] = act.n_updates[done], act.remainder[done]


def ponder_cost(cfg: ModelConfig, n_updates: Tensor, remainder: Tensor, aux: dict[str, Tensor],
                bins: int | None = None) -> Tensor:
    """ACT's weighted ponder cost ``mean(N + R)`` from each position's steps ``n_updates`` and
    remainder ``[B, S]``; records ``aux`` ponder, act_steps and, given ``bins``, the histogram
    ``act_halt_hist [bins]`` of the steps (each in ``[0, bins)``)."""
    ponder = (n_updates + remainder).mean()
    aux["ponder"] = ponder.detach()
    aux["act_steps"] = n_updates.mean().detach()
    if bins is not None:
        # a fixed-size scatter_add instead of ``bincount``, whose output size depends on the data
        # (a host sync on GPU)
        steps = n_updates.detach().long().flatten()
        aux["act_halt_hist"] = torch.zeros(bins, dtype=torch.long, device=steps.device).scatter_add_(
            0, steps, torch.ones_like(steps))
    return cfg.act.ponder_weight * ponder
