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
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm
from tqdm import tqdm

from data_prep.common import (
    DataPrepError,
    atomic_write_bytes,
    atomic_write_json,
    canonical_json,
    describe_inputs,
    expand_inputs,
    run_cli,
    sha256_bytes,
    sha256_file,
)
from data_prep.partition import (
    DEFAULT_UNIT_BYTES,
    PARTITIONS_DIR,
    DocFilter,
    Unit,
    assign_units,
    partial_manifest_path,
    partition_shard_prefix,
    plan_units,
    quick_fingerprint,
    unit_sha256,
)
from data_prep.sources import SourceOptions, SourceStats, iter_documents
from data_prep.tarwriter import tar_bytes
from mythos.data.format import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    data_hash,
    dtype_for_vocab,
    dtype_max_vocab,
    encode_npy,
    member_name,
    shard_name,
)
from mythos.data.tokenizer import Tokenizer

#: Text per work unit sent to a worker: big enough to amortise IPC, small enough to balance load.
BATCH_BYTES = 1 << 20
#: Hidden file recording the build key while a build is in progress (see ``_check_out_dir``).
BUILD_MARKER = ".build.json"
#: Version of the per-partition manifest (``partitions/pNNNNN.json``) read by data_prep.merge.
PARTIAL_VERSION = 1


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


# --------------------------------------------------------------------------------------------
# Worker side: tokenization of one batch of documents. Kept free of any shared state so that
# the result depends only on the batch; ``bench/data_throughput.py`` measures exactly this path.
# --------------------------------------------------------------------------------------------

_WORKER_SP: spm.SentencePieceProcessor | None = None
_WORKER_CFG: tuple[int, float, bytes] = (0, 0.0, b"")


def init_worker(model_path: str, eos_id: int, val_fraction: float, seed: int) -> None:
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


# --------------------------------------------------------------------------------------------
# Main side: packing and shard writing.
# --------------------------------------------------------------------------------------------


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
        self.shards.append(self._write(name, samples))

    def _write(self, name: str, samples: np.ndarray) -> dict[str, Any]:
        data = tar_bytes((member_name(name, i), encode_npy(row)) for i, row in enumerate(samples))
        sha = sha256_bytes(data)
        final = self.out_dir / name
        # Resume: a complete shard from an interrupted (or identical) earlier run is kept as is.
        if final.is_file() and final.stat().st_size == len(data) and sha256_file(final) == sha:
            self.skipped += 1
        else:
            atomic_write_bytes(final, data)
            self.written += 1
        return {
            "name": name,
            "split": self.split,
            "num_samples": int(samples.shape[0]),
            "num_tokens": int(samples.size),
            "sha256": sha,
            "bytes": len(data),
        }


#: One read job: (input file, span within it or None for the whole file); see data_prep.partition.
WorkItem = tuple[Path, "tuple[int, int | None] | None"]


def _work_batches(
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


def _batches(files: Sequence[Path], opts: SourceOptions, stats: dict[str, SourceStats]) -> Iterator[list[str]]:
    """Whole files, no filter (kept for ``bench/data_throughput.py``)."""
    return _work_batches([(f, None) for f in files], opts, stats)


def _tokenize_stream(batches: Iterator[list[str]], init_args: tuple, workers: int) -> Iterator[BatchResult]:
    if workers <= 1:
        init_worker(*init_args)
        yield from map(tokenize_batch, batches)
        return
    # fork: workers inherit the imported modules (fast start); results come back in batch order.
    ctx = mp.get_context("fork" if sys.platform != "win32" else "spawn")
    with ctx.Pool(workers, initializer=init_worker, initargs=init_args) as pool:
        yield from pool.imap(tokenize_batch, batches, chunksize=1)


def _describe_mismatch(old: dict[str, Any], new: dict[str, Any]) -> str:
    diffs = [k for k in ("params", "tokenizer_sha256", "inputs") if old.get(k) != new.get(k)]
    return ", ".join(diffs) or "build key"


def _check_out_dir(out: Path, build: dict[str, Any], overwrite: bool) -> dict[str, Any] | None:
    """Refuse to mix builds in one directory. Returns the existing manifest of the *same* build,
    if any (the caller checks whether it is complete)."""
    found: dict[str, Any] | None = None
    for name in (MANIFEST_NAME, BUILD_MARKER):
        p = out / name
        if not p.is_file():
            continue
        try:
            doc = json.loads(p.read_text())
            old_build = doc["build"] if name == MANIFEST_NAME else doc
        except (ValueError, KeyError):
            old_build = {}
        if old_build.get("key") != build["key"]:
            if not overwrite:
                raise DataPrepError(
                    f"{out} holds shards of a different build ({_describe_mismatch(old_build, build)} "
                    f"differ, per {name}); pass --overwrite to replace them or choose another --out"
                )
            _clear(out)
            return None
        if name == MANIFEST_NAME:
            found = doc
    stray = sorted(p.name for p in out.glob("*-[0-9][0-9][0-9][0-9][0-9].tar")) if out.is_dir() else []
    if stray and found is None and not (out / BUILD_MARKER).is_file():
        if not overwrite:
            raise DataPrepError(
                f"{out} holds shards ({stray[0]}, ...) without a manifest of this build; "
                f"pass --overwrite to replace them or choose another --out"
            )
        _clear(out)
    return found


def _clear(out: Path) -> None:
    partials = (out / PARTITIONS_DIR).glob("p*.json")
    for p in [out / MANIFEST_NAME, out / BUILD_MARKER, *out.glob("*-[0-9][0-9][0-9][0-9][0-9].tar*"), *partials]:
        p.unlink(missing_ok=True)


def _verify_existing(out: Path, manifest: dict[str, Any]) -> bool:
    for s in manifest["shards"]:
        p = out / s["name"]
        if not p.is_file() or p.stat().st_size != s["bytes"] or sha256_file(p) != s["sha256"]:
            return False
    return True


def _load_tokenizer(tokenizer: str | Path, params: ShardParams) -> tuple[Tokenizer, str]:
    """The tokenizer and the shard dtype, with the vocabulary / EOS checks."""
    try:
        tok = Tokenizer(tokenizer)
    except (FileNotFoundError, RuntimeError, OSError) as exc:
        raise DataPrepError(f"cannot load tokenizer {tokenizer}: {exc}") from None
    dtype = dtype_for_vocab(tok.vocab_size) if params.dtype == "auto" else params.dtype
    if tok.vocab_size > dtype_max_vocab(dtype):
        raise DataPrepError(
            f"tokenizer {tok.path} has vocab {tok.vocab_size}, which does not fit --dtype {dtype} "
            f"(max {dtype_max_vocab(dtype)}); use --dtype uint32 or auto"
        )
    if tok.eos_id < 0:
        raise DataPrepError(f"tokenizer {tok.path} has no EOS id (train it with data_prep.train_tokenizer)")
    return tok, dtype


def _manifest_header(params: ShardParams, dtype: str, tok: Tokenizer, build: dict[str, Any]) -> dict[str, Any]:
    """The manifest fields shared by a classic manifest, every partial manifest and the merge."""
    return {
        "format_version": FORMAT_VERSION,
        "seq_len": params.seq_len,
        "tokens_per_sample": params.seq_len + 1,
        "dtype": dtype,
        "sample_format": {
            "member": "<shard stem>/<index:08d>.tokens.npy",
            "packing": "documents joined as doc EOS doc EOS ...; no BOS; tail < seq_len+1 dropped",
            "val_split": "blake2b(key=seed, document utf-8 bytes) / 2**64 < val_fraction",
            "plain_text_document": params.plain_docs,
        },
        "tokenizer": {
            "path": tok.path.as_posix(),
            "sha256": tok.sha256,
            "vocab_size": tok.vocab_size,
            "bos_id": tok.bos_id,
            "eos_id": tok.eos_id,
            "pad_id": tok.pad_id,
            "unk_id": tok.unk_id,
        },
        "build": build,
        "versions": {"sentencepiece": spm.__version__, "numpy": np.__version__},
    }


def split_summary(documents: int, text_bytes: int, stream_tokens: int, shards: list[dict], dropped: int) -> dict:
    """One ``splits.<split>`` entry of a manifest (also used by data_prep.merge to sum partitions)."""
    return {
        "documents": documents,
        "text_bytes": text_bytes,
        "stream_tokens": stream_tokens,
        "samples": sum(s["num_samples"] for s in shards),
        "tokens": sum(s["num_tokens"] for s in shards),
        "dropped_tail_tokens": dropped,
        # bytes per stored token (EOS included): converts loss/token into bits/byte
        "bytes_per_token": round(text_bytes / stream_tokens, 6) if stream_tokens else None,
    }


def _pack(
    work: Sequence[WorkItem],
    tok: Tokenizer,
    dtype: str,
    params: ShardParams,
    out: Path,
    workers: int,
    progress: bool | None,
    doc_filter: DocFilter,
    prefix: str = "",
    total_bytes: int = 0,
) -> tuple[dict[str, SplitPacker], dict[str, int], dict[str, SourceStats]]:
    """Read, filter, tokenize and pack ``work`` into shards under ``out``; returns the packers
    (shard lists and counts), the dropped tail per split and the per-file read statistics."""
    opts = SourceOptions(params.text_field, params.on_bad_utf8, params.plain_docs)  # type: ignore[arg-type]
    source_stats: dict[str, SourceStats] = {}
    packers = {
        split: SplitPacker(split, params.seq_len, params.samples_per_shard, dtype, out, prefix)
        for split in ("train", "val")
    }
    init_args = (str(tok.path), tok.eos_id, params.val_fraction, params.seed)
    with tqdm(
        total=total_bytes,
        unit="B",
        unit_scale=True,
        desc=f"tokenize {prefix}".strip(),
        disable=None if progress is None else not progress,
        file=sys.stderr,
    ) as bar:
        for res in _tokenize_stream(_work_batches(work, opts, source_stats, doc_filter), init_args, workers):
            packers["train"].add(res.train, res.docs[0], res.text_bytes[0])
            packers["val"].add(res.val, res.docs[1], res.text_bytes[1])
            bar.update(sum(res.text_bytes))
    dropped = {split: p.finish() for split, p in packers.items()}
    return packers, dropped, source_stats


def _filters_record(params: ShardParams, doc_filter: DocFilter) -> dict[str, Any]:
    scope = "none" if params.dedup == "none" else "run" if params.num_partitions <= 1 else params.dedup
    return {"min_chars": params.min_chars, "dedup": params.dedup, "dedup_scope": scope, **doc_filter.stats()}


def build_shards(
    tokenizer: str | Path,
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    params: ShardParams,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool | None = None,
    partition: int | None = None,
) -> dict[str, Any]:
    """Build (or resume, or confirm) a shard directory; returns the manifest dict.

    With ``params.num_partitions = N`` the build is partitioned: ``partition=i`` builds only
    partition ``i`` and returns its partial manifest; ``partition=None`` builds all N in turn and
    returns the merged manifest (byte-identical to N separate runs + ``data_prep.merge``)."""
    params.validate()
    t0 = time.perf_counter()
    files = expand_inputs(inputs)
    tok, dtype = _load_tokenizer(tokenizer, params)
    if params.num_partitions:
        return _build_partitioned(files, tok, dtype, params, Path(out_dir), partition, workers, overwrite, progress)
    if partition is not None:
        raise DataPrepError("--partition needs --num-partitions N (the total number of partitions)")
    inputs_desc = describe_inputs(files)
    build = {
        "params": params.key_params(dtype),
        "tokenizer_sha256": tok.sha256,
        # content, not paths: moving the corpus does not change the build
        "inputs": [[d["sha256"], d["bytes"]] for d in inputs_desc],
    }
    build["key"] = sha256_bytes(canonical_json(build).encode())
    out = Path(out_dir)
    existing = _check_out_dir(out, build, overwrite)
    if existing is not None and _verify_existing(out, existing):
        print(f"{out}: up to date ({len(existing['shards'])} shards verified)", file=sys.stderr)
        return existing
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / BUILD_MARKER, build)

    doc_filter = DocFilter(params.min_chars, params.dedup)  # type: ignore[arg-type]
    total = sum(d["bytes"] for d in inputs_desc)
    packers, dropped, source_stats = _pack(
        [(f, None) for f in files], tok, dtype, params, out, workers, progress, doc_filter, total_bytes=total
    )

    n_docs = sum(p.documents for p in packers.values())
    if n_docs == 0:
        raise DataPrepError(f"empty corpus: no documents in {', '.join(map(str, inputs))}")
    train = packers["train"]
    if not train.shards:
        raise DataPrepError(
            f"empty corpus: {train.stream_tokens} train tokens is less than one sample of seq_len+1="
            f"{params.seq_len + 1} tokens (add text or lower --seq-len)"
        )
    if params.val_fraction > 0 and not packers["val"].shards:
        print(
            f"warning: val split has {packers['val'].stream_tokens} tokens, less than one sample; "
            f"no val shards written (raise --val-fraction or add text)",
            file=sys.stderr,
        )

    manifest: dict[str, Any] = {
        **_manifest_header(params, dtype, tok, build),
        **_content_records(inputs_desc, source_stats, params, doc_filter, packers, dropped),
    }
    manifest["data_hash"] = data_hash(manifest)
    atomic_write_json(out / MANIFEST_NAME, manifest)
    (out / BUILD_MARKER).unlink(missing_ok=True)
    written = sum(p.written for p in packers.values())
    skipped = sum(p.skipped for p in packers.values())
    secs = time.perf_counter() - t0
    print(
        f"{out}: {len(manifest['shards'])} shards ({written} written, {skipped} already complete), "
        f"train {manifest['splits']['train']['samples']} samples, val {manifest['splits']['val']['samples']} "
        f"samples, {n_docs} documents, {secs:.1f}s",
        file=sys.stderr,
    )
    return manifest


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _build_partitioned(
    files: list[Path],
    tok: Tokenizer,
    dtype: str,
    params: ShardParams,
    out: Path,
    partition: int | None,
    workers: int,
    overwrite: bool,
    progress: bool | None,
) -> dict[str, Any]:
    n = params.num_partitions
    if partition is not None:
        if not 0 <= partition < n:
            raise DataPrepError(f"--partition {partition} is outside 0..{n - 1} (--num-partitions {n})")
        if overwrite:
            raise DataPrepError(
                "--overwrite with --partition would delete the other partitions' shards; "
                "clear --out once (or run without --partition) instead"
            )
    # A partition must not read the whole corpus to agree on the build key: inputs are keyed by
    # size + head/tail hash; each unit's full content hash is recorded by the partition reading it.
    inputs_desc = [
        {"path": f.as_posix(), "bytes": f.stat().st_size, "fingerprint": quick_fingerprint(f)} for f in files
    ]
    build = {
        "params": params.key_params(dtype),
        "tokenizer_sha256": tok.sha256,
        "inputs": [[d["fingerprint"], d["bytes"]] for d in inputs_desc],
        "input_identity": "sha256(size, first MiB, last MiB) per file; per-unit sha256 in inputs[].units",
    }
    build["key"] = sha256_bytes(canonical_json(build).encode())
    if not (out / BUILD_MARKER).is_file() and not (out / MANIFEST_NAME).is_file():
        # shards listed by a partial manifest of this very build are ours, marker or not (e.g. the
        # final manifest was removed to redo a partition): restore the marker before the check
        for p in sorted((out / PARTITIONS_DIR).glob("p*.json")):
            if (_read_json(p) or {}).get("build", {}).get("key") == build["key"]:
                atomic_write_json(out / BUILD_MARKER, build)
                break
    existing = _check_out_dir(out, build, overwrite)
    if existing is not None and _verify_existing(out, existing):
        print(f"{out}: up to date ({len(existing['shards'])} shards verified)", file=sys.stderr)
        return existing
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / BUILD_MARKER, build)

    units = plan_units(files, params.unit_bytes, params.plain_docs)
    owners = assign_units(units, n)
    header = _manifest_header(params, dtype, tok, build)
    todo = [partition] if partition is not None else list(range(n))
    partials = [
        _run_partition(i, files, inputs_desc, units, owners, header, tok, dtype, params, out, workers, progress)
        for i in todo
    ]
    if partition is not None:
        return partials[0]
    from data_prep.merge import merge_partitions  # merge imports this module's helpers

    return merge_partitions(out)


def _run_partition(
    i: int,
    files: list[Path],
    inputs_desc: list[dict[str, Any]],
    units: list[Unit],
    owners: list[int],
    header: dict[str, Any],
    tok: Tokenizer,
    dtype: str,
    params: ShardParams,
    out: Path,
    workers: int,
    progress: bool | None,
) -> dict[str, Any]:
    """Pack partition ``i`` and write ``partitions/p{i:05d}.json`` (skipped when complete)."""
    n = params.num_partitions
    path = partial_manifest_path(out, i)
    prev = _read_json(path)
    if prev is not None and prev.get("build", {}).get("key") == header["build"]["key"] and _verify_existing(out, prev):
        print(f"{out}: partition {i} of {n} already complete ({len(prev['shards'])} shards verified)", file=sys.stderr)
        return prev
    path.unlink(missing_ok=True)  # a stale or corrupt partial must not outlive a re-run that fails
    t0 = time.perf_counter()
    doc_filter = DocFilter(params.min_chars, params.dedup, n, i)  # type: ignore[arg-type]
    mine = units if doc_filter.hash_assigned else [u for u, o in zip(units, owners) if o == i]
    packers, dropped, source_stats = _pack(
        [(files[u.file], u.span) for u in mine],
        tok,
        dtype,
        params,
        out,
        workers,
        progress,
        doc_filter,
        prefix=partition_shard_prefix(i),
        total_bytes=sum(u.weight for u in mine),
    )
    partial: dict[str, Any] = {
        **header,
        "partial_version": PARTIAL_VERSION,
        "num_partitions": n,
        "partition": i,
        "units": [{**u.to_json(), "sha256": unit_sha256(files[u.file], u)} for u in mine],
        **_content_records(inputs_desc, source_stats, params, doc_filter, packers, dropped),
    }
    atomic_write_json(path, partial)  # last: its presence means the partition is complete
    written = sum(p.written for p in packers.values())
    print(
        f"{out}: partition {i} of {n}: {len(partial['shards'])} shards ({written} written), "
        f"{len(mine)} units, {doc_filter.kept} documents kept, {time.perf_counter() - t0:.1f}s",
        file=sys.stderr,
    )
    return partial


def _content_records(inputs_desc: list[dict[str, Any]], source_stats: dict[str, SourceStats], params: ShardParams,
                     doc_filter: DocFilter, packers: dict[str, SplitPacker], dropped: dict[str, int]) -> dict[str, Any]:
    """The manifest keys that describe what was read and written (inputs with their document
    counts, filters, per-split summaries, shards); shared by full and partial manifests. An
    input a partition did not read counts zero documents."""
    empty = SourceStats()
    return {
        "inputs": [
            {
                **d,
                "documents": source_stats.get(d["path"], empty).documents,
                "skipped_bad_utf8": source_stats.get(d["path"], empty).skipped_bad_utf8,
                "replaced_bad_utf8": source_stats.get(d["path"], empty).replaced_bad_utf8,
            }
            for d in inputs_desc
        ],
        "filters": _filters_record(params, doc_filter),
        "splits": {
            split: split_summary(p.documents, p.text_bytes, p.stream_tokens, p.shards, dropped[split])
            for split, p in packers.items()
        },
        "shards": packers["train"].shards + packers["val"].shards,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_prep.shard", description=__doc__.split("\n")[0])
    p.add_argument("--tokenizer", required=True, help="tokenizer directory or .model file")
    p.add_argument("--input", nargs="+", required=True, help="text/jsonl (.gz/.zst) or parquet files, or directories")
    p.add_argument("--out", required=True, help="output directory for shards + manifest.json")
    p.add_argument("--seq-len", type=int, required=True, help="model context; samples hold seq_len+1 tokens")
    p.add_argument("--val-fraction", type=float, default=0.01)
    p.add_argument("--workers", type=int, default=max(1, (mp.cpu_count() or 2) - 1))
    p.add_argument("--shard-tokens", type=int, default=1 << 25, help="tokens per shard (approx.)")
    p.add_argument("--text-field", default="text", help="jsonl field / parquet column holding the text")
    p.add_argument("--on-bad-utf8", choices=("error", "replace", "skip"), default="error")
    p.add_argument(
        "--plain-docs",
        choices=("paragraph", "file"),
        default="paragraph",
        help="document unit for plain text: blank-line separated paragraph, or whole file",
    )
    p.add_argument("--dtype", choices=("auto", "uint16", "uint32"), default="auto")
    p.add_argument("--seed", type=int, default=0, help="seed of the val split hash")
    p.add_argument("--overwrite", action="store_true", help="replace shards of a different build in --out")
    p.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group("filters (recorded in the manifest; see data_prep.partition)")
    g.add_argument("--min-chars", type=int, default=0, help="drop documents shorter than this (characters)")
    g.add_argument(
        "--dedup",
        choices=("none", "partition", "global"),
        default="none",
        help="drop exact duplicates within each partition, or across the run (hash-assigned partitions)",
    )
    g = p.add_argument_group("partitioned builds (SLURM arrays; merge with python -m data_prep.merge OUT)")
    g.add_argument("--num-partitions", type=int, default=0, help="total partitions N (part of the build identity)")
    g.add_argument("--partition", type=int, default=None, help="build only partition i in 0..N-1 (no merge)")
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


if __name__ == "__main__":
    sys.exit(run_cli(main))
