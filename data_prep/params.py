"""The parameters of a shard build (:class:`ShardParams`): what decides the bytes written."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from data_prep.common import DataPrepError
from data_prep.partition import DEFAULT_UNIT_BYTES


@dataclass(frozen=True)
class ShardParams:
    """Every parameter that affects the bytes written (``--workers`` does not, by design)."""

    seq_len: int
    val_fraction: float = 0.01
    shard_tokens: int = 1 << 25
    text_field: str = "text"
    on_bad_utf8: str = "error"
    plain_docs: str = "paragraph"
    seed: int = 0
    dtype: str = "auto"
    min_chars: int = 0
    """Drop documents shorter than this many characters (0 = keep all)."""
    dedup: str = "none"
    """Exact-duplicate removal: ``none``, ``partition`` or ``global`` (see data_prep.partition)."""
    num_partitions: int = 0
    """0 = classic single build (``train-NNNNN.tar``); N >= 1 = partitioned build (``--num-partitions``)."""
    unit_bytes: int = DEFAULT_UNIT_BYTES
    """Work-unit size of a partitioned build (part of its identity: it decides who packs what)."""

    def validate(self) -> None:
        if self.seq_len < 1:
            raise DataPrepError(f"--seq-len must be >= 1, got {self.seq_len}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise DataPrepError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.shard_tokens < 1:
            raise DataPrepError(f"--shard-tokens must be >= 1, got {self.shard_tokens}")
        if self.min_chars < 0:
            raise DataPrepError(f"--min-chars must be >= 0, got {self.min_chars}")
        if self.dedup not in ("none", "partition", "global"):
            raise DataPrepError(f"--dedup must be none, partition or global, got {self.dedup!r}")
        if self.num_partitions < 0:
            raise DataPrepError(f"--num-partitions must be >= 1, got {self.num_partitions}")
        if self.unit_bytes < 1:
            raise DataPrepError(f"--unit-bytes must be >= 1, got {self.unit_bytes}")

    def key_params(self, dtype: str) -> dict[str, Any]:
        """The parameters entering the build key. Fields added after the first release enter it
        only when set (or, for a partitioned build, always), so shard directories built before
        they existed keep their key and stay "up to date"."""
        d = {**asdict(self), "dtype": dtype}
        defaults = ShardParams(seq_len=self.seq_len)
        for name in ("min_chars", "dedup", "num_partitions", "unit_bytes"):
            if not self.num_partitions and d[name] == getattr(defaults, name):
                del d[name]
        return d

    @property
    def samples_per_shard(self) -> int:
        return max(1, self.shard_tokens // (self.seq_len + 1))
