"""Tokenization of document batches, in worker processes, for :mod:`data_prep.shard`.

The main process reads documents in input order and cuts them into batches of ~``BATCH_BYTES``
(:func:`work_batches`); workers tokenize batches (:func:`tokenize_batch`) and the results are
consumed in batch order (``Pool.imap``, :func:`tokenize_stream`), so the output does not depend on
``--workers``. The worker side keeps no state beyond the tokenizer and the split settings, so a
batch's result depends only on the batch; ``bench/data_throughput.py`` measures exactly this path.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm

from data_prep.partition import DocFilter
from data_prep.sources import SourceOptions, SourceStats, iter_documents

#: Text per work unit sent to a worker: big enough to amortise IPC, small enough to balance load.
BATCH_BYTES = 1 << 20

_WORKER_SP: spm.SentencePieceProcessor | None = None
_WORKER_CFG: tuple[int, float, bytes] = (0, 0.0, b"")


def init_worker(model_path: str, eos_id: int, val_fraction: float, seed: int) -> None:
    """Pool initializer (and the in-process path): load the tokenizer once per process."""
    global _WORKER_SP, _WORKER_CFG
    _WORKER_SP = spm.SentencePieceProcessor(model_file=model_path)
    _WORKER_CFG = (eos_id, val_fraction, seed.to_bytes(8, "little", signed=True))


def is_val_document(doc_bytes: bytes, val_fraction: float, seed_key: bytes) -> bool:
    """Deterministic per-document split: hash of (seed, text) mapped to [0, 1)."""
    if val_fraction <= 0.0:
        return False
    h = hashlib.blake2b(doc_bytes, digest_size=8, key=seed_key).digest()
    return int.from_bytes(h, "little") / 2.0**64 < val_fraction


@dataclass
class BatchResult:
    """Token streams of one batch: ``doc EOS doc EOS ...`` per split, plus counts."""

    train: np.ndarray
    val: np.ndarray
    docs: tuple[int, int] = (0, 0)
    text_bytes: tuple[int, int] = (0, 0)


def tokenize_batch(docs: list[str]) -> BatchResult:
    """Tokenize a batch in the worker (after :func:`init_worker`). Ids are uint32 here; the main
    process narrows them to the shard dtype."""
    assert _WORKER_SP is not None, "init_worker() not called"
    eos, frac, key = _WORKER_CFG
    encoded = [d.encode("utf-8") for d in docs]
    ids = _WORKER_SP.encode(docs, num_threads=1)
    out: tuple[list[int], list[int]] = ([], [])
    n_docs, n_bytes = [0, 0], [0, 0]
    for raw, toks in zip(encoded, ids):
        s = int(is_val_document(raw, frac, key))
        out[s].extend(toks)
        out[s].append(eos)
        n_docs[s] += 1
        n_bytes[s] += len(raw)
    return BatchResult(
        train=np.array(out[0], dtype=np.uint32),
        val=np.array(out[1], dtype=np.uint32),
        docs=(n_docs[0], n_docs[1]),
        text_bytes=(n_bytes[0], n_bytes[1]),
    )


#: One read job: (input file, span within it or None for the whole file); see data_prep.partition.
WorkItem = tuple[Path, "tuple[int, int | None] | None"]


def work_batches(
    work: Sequence[WorkItem],
    opts: SourceOptions,
    stats: dict[str, SourceStats],
    doc_filter: DocFilter | None = None,
) -> Iterator[list[str]]:
    """Documents of ``work`` in order, filtered, cut into ~``BATCH_BYTES`` batches. Batching does
    not affect the output (documents are tokenized independently and re-joined in order)."""
    batch: list[str] = []
    size = 0
    for f, span in work:
        st = stats.setdefault(f.as_posix(), SourceStats())
        for doc in iter_documents(f, opts, st, span):
            if doc_filter is not None and not doc_filter.keep(doc):
                continue
            batch.append(doc)
            size += len(doc)
            if size >= BATCH_BYTES:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch


def file_batches(files: Sequence[Path], opts: SourceOptions, stats: dict[str, SourceStats]) -> Iterator[list[str]]:
    """Whole files, no filter (kept for ``bench/data_throughput.py``)."""
    return work_batches([(f, None) for f in files], opts, stats)


def tokenize_stream(batches: Iterator[list[str]], init_args: tuple, workers: int) -> Iterator[BatchResult]:
    """Tokenized ``batches``, in their order; ``init_args`` as for :func:`init_worker`. With one
    worker everything runs in this process (no pickling, same results)."""
    if workers <= 1:
        init_worker(*init_args)
        yield from map(tokenize_batch, batches)
        return
    # fork: workers inherit the imported modules (fast start); results come back in batch order.
    ctx = mp.get_context("fork" if sys.platform != "win32" else "spawn")
    with ctx.Pool(workers, initializer=init_worker, initargs=init_args) as pool:
        yield from pool.imap(tokenize_batch, batches, chunksize=1)
