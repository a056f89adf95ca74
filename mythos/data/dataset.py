"""Map-style view of one split: global sample index ``g in [0, num_samples)`` -> tokens.

Shards are concatenated in manifest order, so ``g`` maps to (shard, local index) by a binary
search over cumulative counts. Opening checks every shard against the manifest (``verify``) so a
missing, truncated or corrupt shard fails here, naming it, instead of mid-run.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mythos.data.format import DataFormatError, Manifest, ShardInfo
from mythos.data.tarindex import ShardReader, load_index
from mythos.io import sha256_file


def verify_shard(path: Path, info: ShardInfo, mode: str) -> None:
    """Raise :class:`DataFormatError` naming ``path`` when it does not match the manifest."""
    if mode == "none":
        return
    hint = "re-run data_prep.shard with the same arguments to rebuild it"
    if not path.is_file():
        raise DataFormatError(f"shard {path} is missing ({hint})")
    size = path.stat().st_size
    if size != info.bytes:
        raise DataFormatError(
            f"shard {path} is {size} bytes, manifest says {info.bytes} (truncated or replaced; {hint})"
        )
    if mode == "full" and sha256_file(path) != info.sha256:
        raise DataFormatError(f"shard {path} is corrupt: sha256 differs from the manifest ({hint})")


class PartedSamples:
    """Samples stored in consecutive parts (shards, or whole sources): global index ``g`` maps to
    (part ``k``, local index). Subclasses set ``tokens_per_sample``, ``rows``, ``_where`` and call
    :meth:`_set_part_sizes`, and implement :meth:`_read`."""

    tokens_per_sample: int
    rows: int
    _where = ""

    def _set_part_sizes(self, counts: Sequence[int]) -> None:
        self._starts = np.concatenate([[0], np.cumsum(np.asarray(counts, dtype=np.int64))]).astype(np.int64)
        self.num_samples = int(self._starts[-1])

    def _read(self, part: int, index: int) -> np.ndarray:
        raise NotImplementedError

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, g: int) -> np.ndarray:
        if not 0 <= g < self.num_samples:
            raise IndexError(f"sample {g} out of range [0, {self.num_samples}){self._where}")
        k = int(np.searchsorted(self._starts, g, side="right")) - 1
        return self._read(k, int(g - self._starts[k]))

    def get_many(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """``int64 [len(indices), tokens_per_sample]`` in the given order (``[n, 2, tokens_per_sample]``
        for loss-masked data)."""
        shape = (self.tokens_per_sample,) if self.rows == 1 else (self.rows, self.tokens_per_sample)
        out = np.empty((len(indices), *shape), dtype=np.int64)
        for row, g in enumerate(indices):
            out[row] = self[int(g)]
        return out


class PackedSamples(PartedSamples):
    """All samples of one split. ``self[g] -> np.ndarray [tokens_per_sample]`` (uint16/uint32), or
    ``[2, tokens_per_sample]`` (tokens, loss mask) when the manifest has ``loss_mask``."""

    def __init__(self, manifest: Manifest, split: str, verify: str = "full", index_cache: bool = True):
        self.manifest = manifest
        self.split = split
        self.tokens_per_sample = manifest.tokens_per_sample
        self.rows = manifest.sample_rows
        infos = manifest.split_shards(split)
        self.readers: list[ShardReader] = []
        for info in infos:
            path = manifest.directory / info.name
            verify_shard(path, info, verify)
            if not path.is_file():  # verify == "none" still cannot read a missing file
                raise DataFormatError(f"shard {path} is missing (re-run data_prep.shard)")
            index = load_index(path, info.sha256, info.num_samples, index_cache)
            self.readers.append(ShardReader(path, index, manifest.dtype, self.tokens_per_sample, self.rows,
                                            vocab_size=manifest.vocab_size))
        self._where = f" of split '{split}'"
        self._set_part_sizes([len(r) for r in self.readers])

    def _read(self, part: int, index: int) -> np.ndarray:
        return self.readers[part].read(index)

    def close(self) -> None:
        for r in self.readers:
            r.close()
