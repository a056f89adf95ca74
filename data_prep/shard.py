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

    def validate(self) -> None:
        if self.seq_len < 1:
            raise DataPrepError(f"--seq-len must be >= 1, got {self.seq_len}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise DataPrepError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.shard_tokens < 1:
            raise DataPrepError(f"--shard-tokens must be >= 1, got {self.shard_tokens}")

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
        self.shards.append(self._write(shard_name(self.split, len(self.shards)), samples))

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


def _batches(files: Sequence[Path], opts: SourceOptions, stats: dict[str, SourceStats]) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for f in files:
        st = stats[f.as_posix()] = SourceStats()
        for doc in iter_documents(f, opts, st):
            batch.append(doc)
            size += len(doc)
            if size >= BATCH_BYTES:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch


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
    for p in [out / MANIFEST_NAME, out / BUILD_MARKER, *out.glob("*-[0-9][0-9][0-9][0-9][0-9].tar*")]:
        p.unlink(missing_ok=True)


def _verify_existing(out: Path, manifest: dict[str, Any]) -> bool:
    for s in manifest["shards"]:
        p = out / s["name"]
        if not p.is_file() or p.stat().st_size != s["bytes"] or sha256_file(p) != s["sha256"]:
            return False
    return True


def build_shards(
    tokenizer: str | Path,
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    params: ShardParams,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Build (or resume, or confirm) a shard directory; returns the manifest dict."""
    params.validate()
    t0 = time.perf_counter()
    files = expand_inputs(inputs)
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
    inputs_desc = describe_inputs(files)
    build = {
        "params": {**asdict(params), "dtype": dtype},
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

    opts = SourceOptions(params.text_field, params.on_bad_utf8, params.plain_docs)  # type: ignore[arg-type]
    source_stats: dict[str, SourceStats] = {}
    packers = {
        split: SplitPacker(split, params.seq_len, params.samples_per_shard, dtype, out) for split in ("train", "val")
    }
    init_args = (str(tok.path), tok.eos_id, params.val_fraction, params.seed)
    total = sum(d["bytes"] for d in inputs_desc)
    with tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        desc="tokenize",
        disable=None if progress is None else not progress,
        file=sys.stderr,
    ) as bar:
        for res in _tokenize_stream(_batches(files, opts, source_stats), init_args, workers):
            packers["train"].add(res.train, res.docs[0], res.text_bytes[0])
            packers["val"].add(res.val, res.docs[1], res.text_bytes[1])
            bar.update(sum(res.text_bytes))
    dropped = {split: p.finish() for split, p in packers.items()}

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
        "inputs": [
            {
                **d,
                "documents": source_stats[d["path"]].documents,
                "skipped_bad_utf8": source_stats[d["path"]].skipped_bad_utf8,
                "replaced_bad_utf8": source_stats[d["path"]].replaced_bad_utf8,
            }
            for d in inputs_desc
        ],
        "splits": {
            split: {
                "documents": p.documents,
                "text_bytes": p.text_bytes,
                "stream_tokens": p.stream_tokens,
                "samples": sum(s["num_samples"] for s in p.shards),
                "tokens": sum(s["num_tokens"] for s in p.shards),
                "dropped_tail_tokens": dropped[split],
                # bytes per stored token (EOS included): converts loss/token into bits/byte
                "bytes_per_token": round(p.text_bytes / p.stream_tokens, 6) if p.stream_tokens else None,
            }
            for split, p in packers.items()
        },
        "shards": packers["train"].shards + packers["val"].shards,
        "versions": {"sentencepiece": spm.__version__, "numpy": np.__version__},
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_prep.shard", description=__doc__.split("\n")[0])
    p.add_argument("--tokenizer", required=True, help="tokenizer directory or .model file")
    p.add_argument("--input", nargs="+", required=True, help="text/jsonl(.gz) files or directories")
    p.add_argument("--out", required=True, help="output directory for shards + manifest.json")
    p.add_argument("--seq-len", type=int, required=True, help="model context; samples hold seq_len+1 tokens")
    p.add_argument("--val-fraction", type=float, default=0.01)
    p.add_argument("--workers", type=int, default=max(1, (mp.cpu_count() or 2) - 1))
    p.add_argument("--shard-tokens", type=int, default=1 << 25, help="tokens per shard (approx.)")
    p.add_argument("--text-field", default="text")
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
    )
    build_shards(
        a.tokenizer,
        a.input,
        a.out,
        params,
        workers=a.workers,
        overwrite=a.overwrite,
        progress=False if a.no_progress else None,
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
