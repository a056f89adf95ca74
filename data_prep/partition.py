"""Partitioned data prep: which documents a partition reads, and the document filters.

A partitioned build (``python -m data_prep.shard ... --num-partitions N [--partition i]``) splits
the corpus into *work units* and gives every partition a deterministic share of them, so N
SLURM array tasks (or N sequential runs in one process) produce disjoint shard sets that
``python -m data_prep.merge`` joins into one ``manifest.json``.

**Units** (:func:`plan_units`). Inputs are taken in their sorted order (see
:func:`data_prep.common.expand_inputs`) and cut into units of about ``unit_bytes``:

- parquet: consecutive row groups until their uncompressed size reaches ``unit_bytes``
  (weight = that uncompressed size, read from the footer);
- uncompressed jsonl / plain text in paragraph mode: byte ranges ``[k*unit_bytes, (k+1)*unit_bytes)``;
  a range owns the documents that *start* in it (:func:`data_prep.sources.iter_documents`), so
  the ranges of a file yield exactly the file's documents, in order;
- compressed files (``.gz``, ``.zst``; no random access) and ``--plain-docs file``: one unit.

**Assignment** (:func:`assign_units`). Contiguous by cumulative weight: unit ``j`` goes to
partition ``floor((c_j + w_j / 2) * N / W)`` (``c_j`` = weight before it, ``W`` = total), which
balances bytes and keeps each partition's reads sequential. It depends only on the file list,
the file sizes and the parquet footers, never on timing or on which node runs what.

**Filters** (:class:`DocFilter`), applied in input order before tokenization:

- ``--min-chars C``: drop documents shorter than ``C`` characters (after decoding).
- ``--dedup partition``: drop exact duplicates (128-bit blake2b of the UTF-8 bytes) within a
  partition. Free, deterministic; duplicates that land in *different* partitions survive (with
  ``N = 1``, or in an unpartitioned build, this is exact over the whole run).
- ``--dedup global``: documents are assigned to partitions by that content hash
  (``hash mod N``), so all copies of a text meet in one partition and the removal is exact over
  the whole run. Price: every partition reads (not tokenizes) every input, i.e. N-fold read and
  parse work; worth it while tokenization dominates (reading is ~50-100x faster per core).

Both choices are recorded in the build key and the manifest. The val split is unaffected: it is
a function of the document text (``blake2b(seed, text)``), so duplicates were never split across
train and val in the first place.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from data_prep.common import DataPrepError
from data_prep.sources import is_compressed, is_parquet

Dedup = Literal["none", "partition", "global"]
UnitKind = Literal["file", "bytes", "row_groups"]

#: Default work-unit size: small enough to balance hundreds of partitions over a few large files,
#: large enough that per-unit overhead (a seek, a footer read, a span hash) is negligible.
DEFAULT_UNIT_BYTES = 256 << 20
#: Bytes hashed at each end of a file for its cheap identity (see :func:`quick_fingerprint`).
FINGERPRINT_BYTES = 1 << 20
PARTITIONS_DIR = "partitions"
_DEDUP_PERSON = b"mythos-dedup"
_HASH_CHUNK = 1 << 20


def partition_shard_prefix(partition: int) -> str:
    """``p00003``: partition ``3``'s part of its shard names (``train-p00003-00012.tar``)."""
    return f"p{partition:05d}"


def partial_manifest_path(out: Path, partition: int) -> Path:
    return out / PARTITIONS_DIR / f"{partition_shard_prefix(partition)}.json"


@dataclasses.dataclass(frozen=True)
class Unit:
    """A contiguous piece of one input file: bytes ``[start, end)``, row groups ``[start, end)``,
    or the whole file (``kind == "file"``, ``end`` = its size)."""

    file: int
    kind: UnitKind
    start: int
    end: int
    weight: int
    total: int
    """Size of the whole file in the unit's measure (bytes, or row groups): lets the merge check
    that the units of a file tile it completely."""

    @property
    def span(self) -> tuple[int, int | None] | None:
        return None if self.kind == "file" else (self.start, self.end)

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "kind": self.kind, "start": self.start, "end": self.end, "total": self.total}


def _parquet_groups(path: Path, unit_bytes: int, file_index: int) -> list[Unit]:
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path).metadata
    except Exception as exc:  # pyarrow raises several types for a bad footer
        raise DataPrepError(f"{path}: not a readable parquet file ({exc}); check the file") from None
    n = meta.num_row_groups
    units: list[Unit] = []
    start, acc = 0, 0
    for rg in range(n):
        acc += meta.row_group(rg).total_byte_size
        if acc >= unit_bytes or rg == n - 1:
            units.append(Unit(file_index, "row_groups", start, rg + 1, max(acc, 1), n))
            start, acc = rg + 1, 0
    return units


def plan_units(files: Sequence[Path], unit_bytes: int, plain_docs: str) -> list[Unit]:
    """All work units of a build, in input order (see the module docstring)."""
    if unit_bytes < 1:
        raise DataPrepError(f"--unit-bytes must be >= 1, got {unit_bytes}")
    units: list[Unit] = []
    for i, f in enumerate(files):
        size = f.stat().st_size
        if is_parquet(f):
            units += _parquet_groups(f, unit_bytes, i)
        elif is_compressed(f) or plain_docs == "file" or size <= unit_bytes:
            units.append(Unit(i, "file", 0, size, max(size, 1), size))
        else:
            units += [
                Unit(i, "bytes", s, min(size, s + unit_bytes), min(size, s + unit_bytes) - s, size)
                for s in range(0, size, unit_bytes)
            ]
    return units


def assign_units(units: Sequence[Unit], num_partitions: int) -> list[int]:
    """Partition of each unit: contiguous blocks of about equal weight (integer arithmetic)."""
    total = sum(u.weight for u in units) or 1
    out, before = [], 0
    for u in units:
        out.append(min(num_partitions - 1, (2 * before + u.weight) * num_partitions // (2 * total)))
        before += u.weight
    return out


def quick_fingerprint(path: Path) -> str:
    """sha256 of (size, first MiB, last MiB): a cheap identity of an input that every partition
    can compute without reading the corpus (the full content of each unit is hashed by the
    partition that reads it, :func:`unit_sha256`). For parquet the tail is the footer, which
    holds the schema and every row group's statistics."""
    size = path.stat().st_size
    h = hashlib.sha256(size.to_bytes(8, "little"))
    with open(path, "rb") as f:
        h.update(f.read(FINGERPRINT_BYTES))
        if size > FINGERPRINT_BYTES:
            f.seek(max(FINGERPRINT_BYTES, size - FINGERPRINT_BYTES))
            h.update(f.read())
    return h.hexdigest()


def _byte_span(path: Path, unit: Unit) -> tuple[int, int]:
    """File bytes a unit covers: its range, or the row groups' column chunks for parquet."""
    if unit.kind != "row_groups":
        return unit.start, unit.end
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    lo, hi = None, 0
    for rg in range(unit.start, unit.end):
        g = meta.row_group(rg)
        for c in range(g.num_columns):
            col = g.column(c)
            first = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
            lo = first if lo is None else min(lo, first)
            hi = max(hi, first + col.total_compressed_size)
    return lo or 0, hi


def unit_sha256(path: Path, unit: Unit) -> str:
    """sha256 of the bytes a unit covers (provenance: recorded per unit in the manifest)."""
    start, end = _byte_span(path, unit)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        left = end - start
        while left > 0 and (chunk := f.read(min(_HASH_CHUNK, left))):
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


@dataclasses.dataclass
class DocFilter:
    """Document filters and, for ``dedup="global"``, hash assignment to partitions. Stateful (the
    set of seen hashes); one instance per partition run. Counts go into the manifest."""

    min_chars: int = 0
    dedup: Dedup = "none"
    num_partitions: int = 1
    partition: int = 0
    kept: int = 0
    dropped_short: int = 0
    dropped_duplicate: int = 0
    other_partition: int = 0
    _seen: set[bytes] = dataclasses.field(default_factory=set, repr=False)

    @property
    def hash_assigned(self) -> bool:
        return self.dedup == "global" and self.num_partitions > 1

    def keep(self, doc: str) -> bool:
        """Whether this partition keeps ``doc`` (call once per document, in input order)."""
        if self.dedup != "none":
            h = hashlib.blake2b(doc.encode("utf-8"), digest_size=16, person=_DEDUP_PERSON).digest()
            if self.hash_assigned and int.from_bytes(h[:8], "little") % self.num_partitions != self.partition:
                self.other_partition += 1
                return False
        # the length filter runs after assignment so each partition counts only its own drops
        if len(doc) < self.min_chars:
            self.dropped_short += 1
            return False
        if self.dedup != "none":
            if h in self._seen:
                self.dropped_duplicate += 1
                return False
            self._seen.add(h)
        self.kept += 1
        return True

    def stats(self) -> dict[str, int]:
        return {"kept": self.kept, "dropped_short": self.dropped_short, "dropped_duplicate": self.dropped_duplicate}
