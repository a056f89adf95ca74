"""Tokenize corpus files and pack them into fixed-length samples in webdataset tar shards.

    python -m data_prep.shard --tokenizer tok/ --input corpus/ --out shards/ --seq-len 2048

Pipeline (one straight line, deterministic):

1. Inputs are expanded (directories recursively, sorted) and hashed; together with the tokenizer
   sha256 and every output-affecting parameter they form the *build key*.
2. The main process reads documents (see :mod:`data_prep.sources`) in input order and cuts them
   into batches of ~``BATCH_BYTES``. Worker processes tokenize batches; results are consumed in
   batch order (``Pool.imap``), so the output does not depend on ``--workers``.
3. Each document goes to ``val`` iff ``blake2b(seed, document bytes) < val_fraction``: a pure
   function of the text, so identical documents always land in the same split (no exact-duplicate
   leakage between train and val) and no worker or ordering state is involved.
4. Per split, documents are concatenated as ``doc_0 EOS doc_1 EOS ...`` (no BOS: EOS alone marks
   the boundary, GPT-2 style, and saves a token per document) and cut into samples of
   ``seq_len + 1`` tokens. The tail shorter than one sample is dropped and counted in the manifest.
5. Every ``--shard-tokens`` worth of samples becomes one shard, written as ``.tmp`` + ``os.replace``.
   A shard whose final file already has the expected sha256 is not rewritten (resume after an
   interruption, or a no-op re-run). ``manifest.json`` is written last, atomically.

An output directory that holds shards of a *different* build (other params/tokenizer/inputs) is
refused unless ``--overwrite``.

**Partitioned builds** (``--num-partitions N``; see :mod:`data_prep.partition` and
:mod:`data_prep.merge`): the inputs are cut into work units and partition ``i`` packs only its
units, into shards named ``{split}-p{i:05d}-{k:05d}.tar``, and records them in
``partitions/p{i:05d}.json``. ``--partition i`` runs one partition (a SLURM array task); without
it all N run one after another in this process and are merged, which gives the same bytes as N
array tasks followed by ``python -m data_prep.merge OUT``. A partition whose partial manifest
and shards are already complete is skipped.

**Filters**: ``--min-chars`` and ``--dedup none|partition|global`` (see
:mod:`data_prep.partition`), applied in input order before tokenization and counted in the
manifest (``filters``).

Code, one concern per module: this CLI; :mod:`data_prep.build` (the classic and partitioned build
paths), :mod:`data_prep.params` (``ShardParams``), :mod:`data_prep.tokenize_workers` (steps 2-3),
:mod:`data_prep.packing` (step 4), :mod:`data_prep.output` (build key, the "up to date" check,
manifest records) and :mod:`mythos.data.shard_writer` (step 5: the shard bytes, shared with
:mod:`mythos.tasks`).
"""

from __future__ import annotations

import multiprocessing as mp
import sys
from collections.abc import Sequence

from data_prep.build import build_shards
from data_prep.common import run_cli
from data_prep.params import ShardParams
from data_prep.partition import DEFAULT_UNIT_BYTES
from mythos.cli_common import ArgumentParser

__all__ = ["ShardParams", "build_parser", "build_shards", "cli", "main"]


def build_parser() -> ArgumentParser:
    """The ``mythos-prep`` / ``python -m data_prep.shard`` argument parser."""
    p = ArgumentParser(prog="mythos-prep", description=__doc__.split("\n")[0])
    p.add_argument("--tokenizer", required=True, help="tokenizer directory or .model file")
    p.add_argument("--input", nargs="+", required=True, help="text/jsonl (.gz/.zst) or parquet files, or directories")
    p.add_argument("--out", required=True, help="output directory for shards + manifest.json")
    p.add_argument("--seq-len", type=int, required=True, help="model context; samples hold seq_len+1 tokens")
    p.add_argument("--val-fraction", type=float, default=0.01, help="fraction of documents held out for val")
    p.add_argument("--workers", type=int, default=max(1, (mp.cpu_count() or 2) - 1),
                   help="tokenizer worker processes (default: CPU count - 1)")
    p.add_argument("--shard-tokens", type=int, default=1 << 25, help="tokens per shard (approx.)")
    p.add_argument("--text-field", default="text", help="jsonl field / parquet column holding the text")
    p.add_argument("--on-bad-utf8", choices=("error", "replace", "skip"), default="error",
                   help="invalid UTF-8 input: stop, replace the bad bytes, or skip the document")
    p.add_argument(
        "--plain-docs",
        choices=("paragraph", "file"),
        default="paragraph",
        help="document unit for plain text: blank-line separated paragraph, or whole file",
    )
    p.add_argument("--dtype", choices=("auto", "uint16", "uint32"), default="auto",
                   help="token id dtype on disk (auto: uint16 when the vocab fits)")
    p.add_argument("--seed", type=int, default=0, help="seed of the val split hash")
    p.add_argument("--overwrite", action="store_true", help="replace shards of a different build in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    g = p.add_argument_group("filters (recorded in the manifest; see data_prep.partition)")
    g.add_argument("--min-chars", type=int, default=0, help="drop documents shorter than this (characters)")
    g.add_argument(
        "--dedup",
        choices=("none", "partition", "global"),
        default="none",
        help="drop exact duplicates within each partition, or across the run (hash-assigned partitions)",
    )
    g = p.add_argument_group("partitioned builds (SLURM arrays; merge with python -m data_prep.merge --out OUT)")
    g.add_argument("--num-partitions", type=int, default=0, help="total partitions N (part of the build identity)")
    g.add_argument("--partition", type=int, default=None,
                   help="build only partition i in 0..N-1 (no merge; default: all)")
    g.add_argument("--unit-bytes", type=int, default=DEFAULT_UNIT_BYTES, help="work-unit size for partitioning")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    params = ShardParams(
        seq_len=a.seq_len,
        val_fraction=a.val_fraction,
        shard_tokens=a.shard_tokens,
        text_field=a.text_field,
        on_bad_utf8=a.on_bad_utf8,
        plain_docs=a.plain_docs,
        seed=a.seed,
        dtype=a.dtype,
        min_chars=a.min_chars,
        dedup=a.dedup,
        num_partitions=a.num_partitions,
        unit_bytes=a.unit_bytes,
    )
    build_shards(
        a.tokenizer,
        a.input,
        a.out,
        params,
        workers=a.workers,
        overwrite=a.overwrite,
        progress=False if a.no_progress else None,
        partition=a.partition,
    )
    return 0


def cli() -> int:
    """Console-script entry (``mythos-prep``): :func:`main` with one-line errors."""
    return run_cli(main)


if __name__ == "__main__":
    sys.exit(cli())
