"""The data section of a run config (``data:`` in ``configs/run/*.yaml``, presets in
``configs/data/``). Loaded strictly by :mod:`mythos.config` (unknown keys and bad types fail)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Literal

Verify = Literal["full", "size", "none"]


@dataclasses.dataclass
class SourceConfig:
    """One source of a data mixture (``data.sources`` list entry), see :mod:`mythos.data.mixture`."""

    shards: str
    """Shard directory with ``manifest.json`` (as ``DataConfig.shards``)."""

    weight: float
    """Relative share of the mixture's samples (normalised over all sources; > 0)."""

    name: str = ""
    """Label for per-source token counts; default: the directory name (its parent's when the
    directory is called ``shards``)."""

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        p = Path(self.shards)
        return p.parent.name if p.name == "shards" and p.parent.name else p.name

    def validate(self) -> None:
        if not self.shards:
            raise ValueError("a mixture source needs shards (a directory with manifest.json)")
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise ValueError(f"source {self.shards}: weight must be a positive number, got {self.weight}")


@dataclasses.dataclass
class DataConfig:
    shards: str = ""
    """Directory holding ``manifest.json`` and the ``{train,val}-NNNNN.tar`` shards it lists
    (built by ``python -m data_prep.shard``). Exactly one of ``shards`` and ``sources``."""

    sources: list[SourceConfig] = dataclasses.field(default_factory=list)
    """A mixture instead of one directory: ``[{shards, weight, name?}, ...]``. Resolved into fixed
    per-source sample quotas and one deterministic interleave (:mod:`mythos.data.mixture`)."""

    mixture_samples: int = 0
    """Samples per mixture epoch (only with ``sources``). 0 = the largest size at which no source
    repeats a sample; larger values repeat (upsample) the sources that run short."""

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
        if bool(self.shards) == bool(self.sources):
            raise ValueError("set exactly one of shards (a directory with manifest.json) and sources (a mixture list)")
        if self.mixture_samples < 0 or (self.mixture_samples and not self.sources):
            raise ValueError(f"mixture_samples={self.mixture_samples} needs sources and must be >= 0")
        labels = [s.label for s in self.sources]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise ValueError(f"two mixture sources are both named '{dup[0]}'; give them distinct name: values")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.prefetch_factor < 1:
            raise ValueError(f"prefetch_factor must be >= 1, got {self.prefetch_factor}")
        if self.fingerprint_samples < 1:
            raise ValueError(f"fingerprint_samples must be >= 1, got {self.fingerprint_samples}")
