"""Row bookkeeping for the RDT's executions (:mod:`mythos.model.rdt`): which rows of a batch the
looped core runs on, and how the tensors they need are taken.

- :class:`ActiveRows`: per-sequence loop counts run on active rows only. Ordered by T, the rows
  of every iteration are a prefix of the batch, planned on the host.
- :class:`RowsCache`: a :class:`KVCache` seen by the rows still looping in the adaptive exit,
  which fills the exited rows' slots in as it goes.
- :func:`take_rows`: the injection context of a subset of the rows.
- :func:`to_device`: a host index tensor on the device without a host sync.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mythos.model.layers import KVCache


class ActiveRows:
    """Host-side plan for running per-sequence loop counts on active rows only.

    With right-aligned counts, sequence i is active in iterations ``[n - T_i, n)``. Once the rows
    are ordered by T (descending, ``perm``; None when already ordered), the active set of every
    iteration is a prefix: ``active[t]`` rows. All of it is computed on the host from the CPU
    counts, so the loop needs no device sync. ``active[t]`` may be 0 when ``n`` exceeds the
    largest count (ZeRO-3 keeps ranks in step): the core is then called on zero rows.
    """

    def __init__(self, counts: Tensor, n: int, device: torch.device) -> None:
        b = counts.numel()
        order = torch.argsort(counts, descending=True, stable=True)
        self.perm: Tensor | None = None
        self.inverse: Tensor | None = None
        if not bool((order == torch.arange(b)).all()):
            self.perm = to_device(order, device)
            self.inverse = to_device(torch.argsort(order), device)
        first = n - counts[order]  # first active iteration of each ordered row (ascending)
        self.active = [int(v) for v in torch.searchsorted(first, torch.arange(n), right=True)]
        self.start = to_device(first, device)
        self._rows = torch.arange(b, device=device).unsqueeze(-1)

    def order(self, t: Tensor) -> Tensor:
        """``t [B, ...]`` in the plan's row order (by T, descending)."""
        return t if self.perm is None else t[self.perm]

    def restore(self, t: Tensor) -> Tensor:
        """``t [B, ...]`` from the plan's row order back to the caller's."""
        return t if self.inverse is None else t[self.inverse]

    def mask(self, t: int) -> Tensor:
        """``[B, 1]`` bool: rows active in iteration ``t`` (a prefix)."""
        return self._rows < self.active[t]


class RowsCache:
    """A :class:`KVCache` seen by a subset of its rows, for the adaptive exit.

    ``rows`` (None = all): the original indices of the rows the core runs on now. ``update``
    returns past + new keys/values of those rows only (what their attention needs). Stored, every
    core slot ``(t, layer)`` gets this forward's keys/values for **all** rows: the rows computed
    at ``t`` give theirs, the others (exited) keep the newest ones of that layer, i.e. those of
    their exit iteration (the fill-in). ``peek``: return past + new without storing (the KL
    criterion's trial readout through the coda)."""

    def __init__(self, cache: KVCache) -> None:
        self.cache = cache
        self.rows: Tensor | None = None
        self.peek = False
        self.fresh: dict[int, tuple[Tensor, Tensor]] = {}
        """core layer -> this forward's newest keys/values ``[B, kv_heads, S_new, head_dim]``"""

    @property
    def pos(self) -> int:
        return self.cache.pos

    def update(self, key: tuple[int, int], k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        rows = self.rows
        if rows is not None and self.peek:
            past = self.cache.store.get(key)
            if past is None:
                return k, v
            return torch.cat([past[0][rows], k], dim=2), torch.cat([past[1][rows], v], dim=2)
        if rows is not None:  # a core slot with some rows exited: theirs from their exit iteration
            fk, fv = self.fresh[key[1]]
            k, v = fk.index_copy(0, rows, k), fv.index_copy(0, rows, v)
        if key[0] >= 0 and not self.peek:
            self.fresh[key[1]] = (k, v)
        self.cache.peek = self.peek
        try:
            full_k, full_v = self.cache.update(key, k, v)
        finally:
            self.cache.peek = False
        return (full_k, full_v) if rows is None else (full_k[rows], full_v[rows])


def take_rows(ctx: object, keep: Tensor) -> object:
    """The injection context of the rows ``keep`` (bool over the working rows): per-row tensors
    (``[a, S, d]``) are indexed, per-channel ones (LTI's ``A_bar [d]``) kept."""
    if isinstance(ctx, tuple):
        return tuple(take_rows(c, keep) for c in ctx)
    if isinstance(ctx, Tensor) and ctx.dim() >= 2 and ctx.shape[0] == keep.numel():
        return ctx[keep]
    return ctx


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """Host index tensor -> ``device`` without a host sync: a plain ``.to("cuda")`` from pageable
    memory waits for the copy; from pinned memory with ``non_blocking`` it is queued."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
