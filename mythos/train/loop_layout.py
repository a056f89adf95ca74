"""Which rank and micro-batch runs each sample of an RDT step, chosen by the samples' loop counts.

Every sample's loop count ``T`` is a pure function of ``(seed, step, global position)``
(:func:`mythos.model.loops.sample_loop_counts`; with ``schedule=hops`` of the hop count of the
sample at that position, :class:`mythos.data.loader.StepHops`), so it does not depend on the world
size and a resumed run redraws it exactly. Only *who* runs a sample depends on the layout:

1. the step's ``B`` positions are ordered by ``T`` (descending; ties by position);
2. the ordered list is cut into ``accum`` groups of ``W * m``: group ``k`` is micro-batch ``k`` of
   every rank, so a micro-batch holds samples of similar ``T``;
3. inside a group the samples are dealt to the ranks in a snake (0..W-1, W-1..0, ...), which
   balances the ranks' total loop work, and each rank's micro-batch stays ordered by ``T``.

Why it matters: with active-row execution (``loops.execution=active``) a micro-batch costs
``sum T_i`` core applications, but it runs ``max T_i`` iterations; under ZeRO-3 every rank must
make the same number of core calls per micro-step (parameters are all-gathered per call), so all
ranks run their group's maximum, and grouping similar ``T`` keeps that close to each rank's own.
Under ZeRO 0-2 a micro-batch runs only its own maximum.

``layout(step)`` returns the permutation of global positions the loader applies before it gives
rank ``r`` the contiguous slice ``[r * B/W, (r+1) * B/W)`` cut into micro-batches of ``m``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from mythos.model.config import LoopConfig
from mythos.model.loops import sample_loop_counts


class LoopLayout:
    """Layout of an RDT step. Picklable (the loader's workers call it)."""

    def __init__(self, loops: LoopConfig, seed: int, global_batch: int, micro_batch: int, world_size: int,
                 *, lockstep: bool, step_hops: Callable[[int], np.ndarray] | None = None) -> None:
        self.loops, self.seed = loops, seed
        self.step_hops = step_hops
        """``schedule=hops``: ``step -> hop count [B]`` of the samples by global position."""
        self.global_batch, self.micro_batch, self.world_size = global_batch, micro_batch, world_size
        self.accum = global_batch // (micro_batch * world_size)
        self.lockstep = lockstep
        """ZeRO-3: every rank runs its micro-batch group's max T (same number of core calls)."""
        self._cache: tuple[int, torch.Tensor, np.ndarray] | None = None

    @property
    def per_sequence(self) -> bool:
        """False when every sample of a step has the same T (fixed / per-batch schedules)."""
        return self.loops.schedule in ("poisson", "uniform", "hops")

    def counts(self, step: int) -> torch.Tensor:
        """``T [B]`` (int64, CPU) by global position."""
        return self._plan(step)[1]

    def __call__(self, step: int) -> np.ndarray:
        """Global positions ``[B]`` in layout order (rank-major, then micro-batch, then row)."""
        return self._plan(step)[2]

    def _plan(self, step: int) -> tuple[int, torch.Tensor, np.ndarray]:
        if self._cache is None or self._cache[0] != step:
            hops = None if self.step_hops is None else torch.from_numpy(self.step_hops(step))
            counts = sample_loop_counts(self.loops, self.seed, step, self.global_batch, hops)
            self._cache = (step, counts, self._order(counts.numpy()))
        return self._cache

    def _order(self, t: np.ndarray) -> np.ndarray:
        b, w, m = self.global_batch, self.world_size, self.micro_batch
        if not self.per_sequence or self.loops.execution == "masked":  # masked: the old, global-max way
            return np.arange(b, dtype=np.int64)
        ranked = np.lexsort((np.arange(b), -t))  # T descending, ties by position
        # slot[r, k, i]: row i of rank r's micro-batch k
        slot = np.empty((w, self.accum, m), dtype=np.int64)
        for k in range(self.accum):
            group = ranked[k * w * m : (k + 1) * w * m].reshape(m, w)  # round i deals W samples
            group[1::2] = group[1::2, ::-1]  # snake: odd rounds deal the ranks in reverse
            slot[:, k, :] = group.T
        return slot.reshape(-1)

    def n_steps(self, step: int, micro_index: int, micro_counts: torch.Tensor) -> int:
        """Iterations micro-batch ``micro_index`` runs: its group's max T under lockstep (ZeRO-3),
        else its own max; with masked execution, the global batch's max (every row runs it)."""
        if self.loops.execution == "masked":
            return int(self.counts(step).max())
        if not self.lockstep:
            return int(micro_counts.max())
        b = self.world_size * self.micro_batch
        counts, order = self._plan(step)[1:]
        group = order.reshape(self.world_size, self.accum, self.micro_batch)[:, micro_index].reshape(b)
        return int(counts[torch.from_numpy(group)].max())


def h0_noise(std: float, seed: int, step: int, positions: torch.Tensor, shape: tuple[int, int],
             device: torch.device) -> torch.Tensor:
    """Initial RDT states ``[len(positions), *shape]`` (fp32), TruncNormal(0, std) on [-2 std, 2 std].

    Each sample's noise comes from its own generator seeded by ``(seed, step, global position)``,
    like its loop count, so it does not depend on the rank, the world size or the layout, and a
    run resumed on another world size draws the same states. Generated on ``device`` (one small
    generator per sample, no host-to-device copy of the noise); CPU and CUDA streams differ."""
    out = torch.empty(len(positions), *shape, device=device)
    for i, pos in enumerate(positions.tolist()):
        key = np.random.SeedSequence([seed, 0x40, step, pos]).generate_state(2, dtype=np.uint32)
        g = torch.Generator(device=device)
        g.manual_seed(int(key[0]) << 31 ^ int(key[1]))
        torch.nn.init.trunc_normal_(out[i], std=std, a=-2 * std, b=2 * std, generator=g)
    return out
