"""Packing token streams into fixed-length samples and shards, for :mod:`data_prep.shard`.

Per split, documents arrive as ``doc_0 EOS doc_1 EOS ...`` (no BOS: EOS alone marks the
boundary, GPT-2 style, and saves a token per document) and are cut into samples of ``seq_len + 1``
tokens; every ``samples_per_shard`` samples become one shard, written by
:func:`mythos.data.shard_writer.write_shard`. The tail shorter than one sample is dropped and
counted in the manifest.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from data_prep.params import ShardParams
from data_prep.partition import DocFilter
from data_prep.sources import SourceOptions, SourceStats
from data_prep.tokenize_workers import WorkItem, tokenize_stream, work_batches
from mythos.data.format import SPLITS, shard_name
from mythos.data.shard_writer import write_shard
from mythos.data.tokenizer import Tokenizer


@dataclass(frozen=True)
class BuildContext:
    """What every step of one build shares: the tokenizer, the resolved shard dtype, the
    parameters, the output directory and how to run (workers, progress bar)."""

    tok: Tokenizer
    dtype: str
    params: ShardParams
    out: Path
    workers: int = 1
    progress: bool | None = None
    """None: tqdm decides (a TTY shows a bar); True/False force it."""


@dataclass
class SplitPacker:
    """Accumulates one split's token stream and emits full shards of packed samples."""

    split: str
    seq_len: int
    samples_per_shard: int
    dtype: str
    out_dir: Path
    prefix: str = ""
    """Partition part of the shard names (``p00003`` -> ``train-p00003-00000.tar``); '' = classic."""
    pending: list[np.ndarray] = field(default_factory=list)
    pending_tokens: int = 0
    shards: list[dict[str, Any]] = field(default_factory=list)
    documents: int = 0
    text_bytes: int = 0
    stream_tokens: int = 0
    written: int = 0
    skipped: int = 0

    def add(self, tokens: np.ndarray, docs: int, text_bytes: int) -> None:
        self.documents += docs
        self.text_bytes += text_bytes
        self.stream_tokens += len(tokens)
        if len(tokens):
            self.pending.append(tokens)
            self.pending_tokens += len(tokens)
        shard_len = self.samples_per_shard * (self.seq_len + 1)
        while self.pending_tokens >= shard_len:
            self._emit(shard_len)

    def finish(self) -> int:
        """Write the last (short) shard; return the number of dropped tail tokens."""
        full = self.pending_tokens // (self.seq_len + 1) * (self.seq_len + 1)
        if full:
            self._emit(full)
        dropped = self.pending_tokens
        self.pending, self.pending_tokens = [], 0
        return dropped

    def _emit(self, n_tokens: int) -> None:
        flat = np.concatenate(self.pending)
        rest = flat[n_tokens:]
        self.pending = [rest] if len(rest) else []
        self.pending_tokens = len(rest)
        samples = flat[:n_tokens].astype(self.dtype).reshape(-1, self.seq_len + 1)
        k = len(self.shards)
        name = f"{self.split}-{self.prefix}-{k:05d}.tar" if self.prefix else shard_name(self.split, k)
        entry, written = write_shard(self.out_dir, name, self.split, samples)
        self.shards.append(entry)
        self.written += written
        self.skipped += not written


@dataclass
class PackResult:
    """What packing produced: per split its packer (shards, counts) and dropped tail, and the
    per-input-file read statistics."""

    packers: dict[str, SplitPacker]
    dropped: dict[str, int]
    source_stats: dict[str, SourceStats]

    @property
    def documents(self) -> int:
        return sum(p.documents for p in self.packers.values())

    @property
    def written(self) -> int:
        return sum(p.written for p in self.packers.values())

    @property
    def skipped(self) -> int:
        return sum(p.skipped for p in self.packers.values())

    @property
    def shards(self) -> list[dict[str, Any]]:
        """Manifest order: all train shards, then all val shards."""
        return [s for split in SPLITS for s in self.packers[split].shards]


def pack(
    ctx: BuildContext, work: Sequence[WorkItem], doc_filter: DocFilter, *, prefix: str = "", total_bytes: int = 0
) -> PackResult:
    """Read, filter, tokenize and pack ``work`` into shards under ``ctx.out``. ``prefix`` names a
    partition's shards; ``total_bytes`` only sizes the progress bar."""
    params = ctx.params
    opts = SourceOptions(params.text_field, params.on_bad_utf8, params.plain_docs)  # type: ignore[arg-type]
    source_stats: dict[str, SourceStats] = {}
    packers = {
        split: SplitPacker(split, params.seq_len, params.samples_per_shard, ctx.dtype, ctx.out, prefix)
        for split in SPLITS
    }
    init_args = (str(ctx.tok.path), ctx.tok.eos_id, params.val_fraction, params.seed)
    with tqdm(
        total=total_bytes,
        unit="B",
        unit_scale=True,
        desc=f"tokenize {prefix}".strip(),
        disable=None if ctx.progress is None else not ctx.progress,
        file=sys.stderr,
    ) as bar:
        batches = work_batches(work, opts, source_stats, doc_filter)
        for res in tokenize_stream(batches, init_args, ctx.workers):
            packers["train"].add(res.train, res.docs[0], res.text_bytes[0])
            packers["val"].add(res.val, res.docs[1], res.text_bytes[1])
            bar.update(sum(res.text_bytes))
    dropped = {split: p.finish() for split, p in packers.items()}
    return PackResult(packers, dropped, source_stats)
