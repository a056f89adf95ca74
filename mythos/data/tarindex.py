"""Random access into uncompressed tar shards: a member-offset index plus ``os.pread``.

The index is built once per shard with :mod:`tarfile` (which walks the headers) and cached
beside the shard, keyed by the shard's sha256 so a rebuilt shard never reuses a stale index.
Reading sample ``i`` is then one ``pread`` of ``sizes[i]`` bytes at ``offsets[i]``: no tar
parsing, no decompression, O(1) seek, safe to share across forked DataLoader workers (each
process opens its own descriptor).
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np

from mythos.data.format import DataFormatError, member_name


def index_cache_path(shard: Path, sha256: str) -> Path:
    return shard.with_name(f".{shard.name}.{sha256[:16]}.idx.npy")


def build_index(shard: Path, expected_samples: int) -> np.ndarray:
    """``int64 [n, 2]`` (data offset, size) of every member, checked against the naming scheme."""
    rows: list[tuple[int, int]] = []
    try:
        with tarfile.open(shard, mode="r:") as tar:
            for i, m in enumerate(tar):
                if m.name != member_name(shard.name, i):
                    raise DataFormatError(
                        f"shard {shard}: member {i} is '{m.name}', expected '{member_name(shard.name, i)}' "
                        f"(not a mythos shard, or corrupt; rebuild with data_prep.shard)"
                    )
                rows.append((m.offset_data, m.size))
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataFormatError(f"shard {shard}: unreadable tar ({exc}); rebuild with data_prep.shard") from None
    if len(rows) != expected_samples:
        raise DataFormatError(
            f"shard {shard}: {len(rows)} samples, manifest says {expected_samples} (truncated or corrupt; "
            f"rebuild with data_prep.shard)"
        )
    return np.asarray(rows, dtype=np.int64).reshape(-1, 2)


def load_index(shard: Path, sha256: str, expected_samples: int, cache: bool) -> np.ndarray:
    """Index from the cache when valid, else built (and cached when ``cache`` and writable)."""
    path = index_cache_path(shard, sha256)
    if cache and path.is_file():
        try:
            idx = np.load(path, allow_pickle=False)
            if idx.shape == (expected_samples, 2) and idx.dtype == np.int64:
                return idx
        except (OSError, ValueError):
            pass  # unreadable cache: rebuild below
    idx = build_index(shard, expected_samples)
    if cache:
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                np.save(f, idx, allow_pickle=False)
            os.replace(tmp, path)
        except OSError:  # read-only shard directory: keep the index in memory only
            tmp.unlink(missing_ok=True)
    return idx


CORRUPT_HINT = ("the shard's bytes are corrupt; data.verify: size checks only file sizes, data.verify: full "
                "(sha256 at start-up) would refuse it; rebuild it with data_prep.shard")


class ShardReader:
    """Reads packed samples of one shard by position. ``read(i) -> np.ndarray [tokens_per_sample]``,
    or ``[rows, tokens_per_sample]`` for loss-masked shards (``rows = 2``: tokens, mask)."""

    def __init__(self, path: Path, index: np.ndarray, dtype: str, tokens_per_sample: int, rows: int = 1,
                 vocab_size: int | None = None):
        """``vocab_size``: every read checks its token ids are below it (and a mask row is 0/1)."""
        self.path = path
        self.vocab_size = vocab_size
        self.index = index
        self.dtype = np.dtype(dtype)
        self.tokens_per_sample = tokens_per_sample
        self.rows = rows
        self.shape = (tokens_per_sample,) if rows == 1 else (rows, tokens_per_sample)
        self._fd: int | None = None
        self._pid = -1
        self._header = -1  # .npy header length, identical for all members of a shard

    def __len__(self) -> int:
        return len(self.index)

    def _descriptor(self) -> int:
        # A descriptor inherited through fork shares its file offset; pread ignores offsets, but
        # reopen per process anyway so a worker never depends on its parent's file table.
        if self._fd is None or self._pid != os.getpid():
            self._fd = os.open(self.path, os.O_RDONLY)
            self._pid = os.getpid()
        return self._fd

    def read(self, i: int) -> np.ndarray:
        offset, size = self.index[i]
        data = os.pread(self._descriptor(), int(size), int(offset))
        if len(data) != size:
            raise DataFormatError(f"shard {self.path}: short read at sample {i} (file truncated?)")
        if self._header < 0:
            self._header = self._parse_header(data, i)
        arr = np.frombuffer(data, dtype=self.dtype, offset=self._header)
        if arr.size != self.rows * self.tokens_per_sample:
            raise DataFormatError(f"shard {self.path}: sample {i} holds {arr.size} values, not "
                                  f"{self.rows * self.tokens_per_sample} ({CORRUPT_HINT})")
        arr = arr if self.rows == 1 else arr.reshape(self.shape)
        self._check_values(arr, i)
        return arr

    def _check_values(self, arr: np.ndarray, i: int) -> None:
        """Per-sample validation on the hot path (one ``max`` over a few thousand ids: ~1 us, next
        to milliseconds per step): an id past the vocabulary would otherwise crash the embedding
        lookup naming nothing, or, on GPU, read garbage. Bytes flipped to *another valid* id cannot
        be seen here; only ``data.verify: full`` (sha256 at start-up) catches those."""
        tokens = arr if self.rows == 1 else arr[0]
        if self.vocab_size is not None and int(tokens.max()) >= self.vocab_size:
            pos = int(np.argmax(tokens >= self.vocab_size))
            raise DataFormatError(f"shard {self.path}: sample {i} has token id {int(tokens[pos])} at position {pos}, "
                                  f"past the vocabulary ({self.vocab_size}) ({CORRUPT_HINT})")
        if self.rows == 2 and int(arr[1].max()) > 1:
            raise DataFormatError(f"shard {self.path}: sample {i} has a loss-mask value {int(arr[1].max())} "
                                  f"(expected 0/1) ({CORRUPT_HINT})")

    def _parse_header(self, data: bytes, i: int) -> int:
        """Check the first member's .npy header against the manifest; return its length."""
        buf = io.BytesIO(data)
        try:
            version = np.lib.format.read_magic(buf)
            read_header = np.lib.format.read_array_header_1_0
            if version != (1, 0):
                read_header = np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(buf)
        except ValueError:
            shape, dtype = None, None
        if shape != self.shape or dtype != self.dtype:
            raise DataFormatError(
                f"shard {self.path}: sample {i} is {dtype} {shape}, manifest says {self.dtype} "
                f"{self.shape} (manifest and shard disagree; rebuild)"
            )
        return buf.tell()

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def __getstate__(self) -> dict:  # picklable for spawn-started workers: no descriptor
        state = dict(self.__dict__)
        state["_fd"], state["_pid"] = None, -1
        return state
