"""The data section of a run config (``data:`` in ``configs/run/*.yaml``, presets in
``configs/data/``). Loaded strictly by :mod:`mythos.config` (unknown keys and bad types fail)."""

from __future__ import annotations

import dataclasses
from typing import Literal

Verify = Literal["full", "size", "none"]


@dataclasses.dataclass
class DataConfig:
    shards: str
    """Directory holding ``manifest.json`` and the ``{train,val}-NNNNN.tar`` shards it lists
    (built by ``python -m data_prep.shard``)."""

    seed: int = 0
    """Seed of the per-epoch sample permutation. Part of the resume state: resuming with another
    seed is refused (it would silently change the data order)."""

    shuffle: bool = True
    """Shuffle samples with a seeded PCG64 permutation per epoch. ``False`` keeps stored order
    (for debugging and round-trip checks; never for training)."""

    num_workers: int = 0
    """DataLoader worker processes per rank. Workers receive whole micro-batches in order, so
    this changes throughput only, never the samples or their order."""

    prefetch_factor: int = 2
    """Micro-batches each worker prepares ahead (only with ``num_workers > 0``)."""

    pin_memory: bool = False
    """Pin host memory of yielded tensors (speeds host-to-GPU copies)."""

    verify: Verify = "full"
    """Shard check when the loader opens: ``full`` = sha256 of every shard against the manifest
    (reads all data once), ``size`` = byte sizes only (instant, catches truncation), ``none``."""

    index_cache: bool = True
    """Cache each shard's member-offset index beside it (``.<shard>.<sha>.idx.npy``); falls back
    to memory when the directory is read-only."""

    fingerprint_samples: int = 64
    """How many leading training samples :meth:`TrainLoader.fingerprint` hashes. Runs that must
    see identical data (matched comparisons) compare this fingerprint."""

    def validate(self) -> None:
        if not self.shards:
            raise ValueError("shards must name a directory with manifest.json")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.prefetch_factor < 1:
            raise ValueError(f"prefetch_factor must be >= 1, got {self.prefetch_factor}")
        if self.fingerprint_samples < 1:
            raise ValueError(f"fingerprint_samples must be >= 1, got {self.fingerprint_samples}")
