"""Data pipeline throughput: tokenization (our worker path vs raw sentencepiece) and the loader.

    python bench/data_throughput.py [--corpus data/demo] [--write-docs docs/data.md]

1. *Tokenization, per worker*: ``data_prep.tokenize_workers.tokenize_batch`` (encode + val-split hash + EOS
   join + numpy packing) against a bare ``SentencePieceProcessor.encode`` of the same document
   batches in the same process (the ceiling). Target: ratio >= 0.8. Best of ``--repeats``.
2. *Sharding end to end*: ``build_shards`` with ``--workers`` processes, into a temp dir.
3. *Loader*: ``TrainLoader.next_step`` tokens/s (delivered ``input_ids`` tokens), 0 and 2 workers.
4. *Parquet input* (FineWeb-style ``text`` column, row groups of 1000 documents, pyarrow's default
   snappy compression): reading alone, and read + tokenize in one process, i.e. what one
   tokenizer core of a partition achieves. ``--extrapolate`` turns that per-core rate into the
   wall time for 100B tokens on K nodes of C cores (an extrapolation, not a measurement).

Uses the demo corpus when it exists (``make data``), else a 4 MB Shakespeare slice with a freshly
trained 8192 BPE tokenizer.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import sentencepiece as spm  # noqa: E402

from data_prep.common import expand_inputs  # noqa: E402
from data_prep.demo_corpus import write_text_slice  # noqa: E402
from data_prep.shard import ShardParams, build_shards  # noqa: E402
from data_prep.sources import SourceOptions, iter_documents  # noqa: E402
from data_prep.tokenize_workers import file_batches, init_worker, tokenize_batch  # noqa: E402
from data_prep.train_tokenizer import TokenizerParams, train_tokenizer  # noqa: E402
from mythos.data import DataConfig, Tokenizer, build_train_loader  # noqa: E402

MARK_BEGIN, MARK_END = "<!-- bench:data_throughput:begin -->", "<!-- bench:data_throughput:end -->"


def corpus_inputs(corpus: Path, work: Path) -> tuple[list[Path], Path]:
    raw, tok = corpus / "raw", corpus / "tokenizer"
    if raw.is_dir() and (tok / "tokenizer.model").is_file():
        return [p for p in sorted(raw.iterdir()) if p.is_dir()], tok
    files = write_text_slice(work / "text", 4_000_000)
    train_tokenizer(files, work / "tok", TokenizerParams(vocab_size=8192))
    return files, work / "tok"


def bench_tokenize(inputs: list[Path], tok: Path, repeats: int) -> dict:
    stats: dict = {}
    batches = list(file_batches(expand_inputs(inputs), SourceOptions(), stats))
    n_bytes = sum(len(d.encode()) for b in batches for d in b)
    t = Tokenizer(tok)
    sp = spm.SentencePieceProcessor(model_file=str(t.path))
    init_worker(str(t.path), t.eos_id, 0.01, 0)
    best_raw = best_ours = float("inf")
    n_tok = 0
    for _ in range(repeats):  # interleaved, so machine noise hits both alike
        t0 = time.perf_counter()
        n_tok = sum(len(ids) for b in batches for ids in sp.encode(b, num_threads=1))
        best_raw = min(best_raw, time.perf_counter() - t0)
        t0 = time.perf_counter()
        for b in batches:
            tokenize_batch(b)
        best_ours = min(best_ours, time.perf_counter() - t0)
    return {
        "mb": n_bytes / 1e6,
        "tokens": n_tok,
        "raw_mb_s": n_bytes / 1e6 / best_raw,
        "raw_tok_s": n_tok / best_raw,
        "ours_mb_s": n_bytes / 1e6 / best_ours,
        "ours_tok_s": n_tok / best_ours,
        "ratio": best_raw / best_ours,
    }


def bench_shard(inputs: list[Path], tok: Path, work: Path, workers: int, n_mb: float) -> dict:
    t0 = time.perf_counter()
    m = build_shards(tok, inputs, work / "shards", ShardParams(seq_len=256), workers=workers, progress=False)
    secs = time.perf_counter() - t0
    return {"seconds": secs, "mb_s": n_mb / secs, "shards_dir": work / "shards", "manifest": m}


def bench_parquet(inputs: list[Path], tok: Path, work: Path, repeats: int) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = [d for f in expand_inputs(inputs) for d in iter_documents(f, SourceOptions())]
    path = work / "corpus.parquet"
    pq.write_table(pa.table({"text": docs}), path, row_group_size=1000)
    t = Tokenizer(tok)
    init_worker(str(t.path), t.eos_id, 0.01, 0)
    n_bytes = sum(len(d.encode()) for d in docs)
    best_read = best_all = float("inf")
    n_tok = 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _doc in iter_documents(path, SourceOptions()):
            pass
        best_read = min(best_read, time.perf_counter() - t0)
        t0 = time.perf_counter()
        n_tok = 0
        for batch in file_batches([path], SourceOptions(), {}):
            res = tokenize_batch(batch)
            n_tok += len(res.train) + len(res.val)
        best_all = min(best_all, time.perf_counter() - t0)
    return {
        "file_mb": path.stat().st_size / 1e6,
        "read_mb_s": n_bytes / 1e6 / best_read,
        "tok_s": n_tok / best_all,
        "mb_s": n_bytes / 1e6 / best_all,
    }


def extrapolate(tok_s_per_core: float, tokens: float = 100e9, task_cores: int = 8) -> list[tuple[str, str]]:
    """Wall time for ``tokens`` on K nodes x C cores, run as ``C / task_cores`` array tasks per node
    (each: ``task_cores - 1`` tokenizer workers at the measured single-core rate, plus the main
    process that reads, packs and writes). Linear by construction: an extrapolation, not a
    measurement; it assumes the file system delivers ~4 bytes of text per token to every task."""
    rows = []
    for nodes, cores in ((1, 32), (8, 32), (32, 32), (64, 64)):
        workers = nodes * (cores // task_cores) * (task_cores - 1)
        secs = tokens / (workers * tok_s_per_core)
        rows.append((f"100B tokens, {nodes} x {cores}-core node(s) (extrapolated)", f"{secs / 3600:.2f} h"))
    return rows


def bench_loader(shards: Path, workers: int, steps: int) -> dict:
    ld = build_train_loader(DataConfig(shards=str(shards), num_workers=workers, verify="size"), 64, 16)
    ld.next_step()  # warm-up: index load, worker start
    t0 = time.perf_counter()
    toks = 0
    for _ in range(steps):
        toks += sum(mb["input_ids"].numel() for mb in ld.next_step())
    secs = time.perf_counter() - t0
    ld.close()
    return {"tok_s": toks / secs, "samples_s": steps * 64 / secs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus", type=Path, default=REPO / "data" / "demo")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--loader-steps", type=int, default=200)
    p.add_argument("--write-docs", type=Path, default=None, help="update the Benchmarks section of this file")
    p.add_argument("--skip-loader", action="store_true", help="tokenization and parquet rows only")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        inputs, tok = corpus_inputs(a.corpus, work)
        tk = bench_tokenize(inputs, tok, a.repeats)
        pqr = bench_parquet(inputs, tok, work, a.repeats)
        sh = bench_shard(inputs, tok, work, a.workers, tk["mb"])
        ld = {} if a.skip_loader else {w: bench_loader(sh["shards_dir"], w, a.loader_steps) for w in (0, 2)}
    rows = [
        ("corpus", f"{tk['mb']:.1f} MB text, {tk['tokens'] / 1e6:.2f} M tokens, vocab {Tokenizer(tok).vocab_size}"),
        ("raw sentencepiece encode (1 thread)", f"{tk['raw_mb_s']:.2f} MB/s, {tk['raw_tok_s'] / 1e6:.2f} M tok/s"),
        ("shard worker path (1 process)", f"{tk['ours_mb_s']:.2f} MB/s, {tk['ours_tok_s'] / 1e6:.2f} M tok/s"),
        ("worker / raw ratio (target >= 0.8)", f"{tk['ratio']:.2f}"),
        (f"build_shards end to end ({a.workers} workers)", f"{sh['seconds']:.2f} s, {sh['mb_s']:.2f} MB/s"),
        ("parquet read only (text column, 1 core)", f"{pqr['read_mb_s']:.0f} MB/s ({pqr['file_mb']:.1f} MB file)"),
        ("parquet read + tokenize (1 core)", f"{pqr['mb_s']:.2f} MB/s, {pqr['tok_s'] / 1e6:.2f} M tok/s"),
    ]
    if ld:
        rows += [
            ("loader, 0 workers (B=64, m=16, L=256)", f"{ld[0]['tok_s'] / 1e6:.2f} M tok/s"),
            ("loader, 2 workers", f"{ld[2]['tok_s'] / 1e6:.2f} M tok/s"),
        ]
    rows += extrapolate(min(pqr["tok_s"], tk["ours_tok_s"]))
    width = max(len(r[0]) for r in rows)
    table = "\n".join(f"| {k:<{width}} | {v} |" for k, v in rows)
    table = f"| {'measure':<{width}} | result |\n|{'-' * (width + 2)}|--------|\n" + table
    print(table)
    if a.write_docs:
        host = f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}"
        cmd = "python bench/data_throughput.py " + " ".join(sys.argv[1:])
        block = f"{MARK_BEGIN}\nMeasured on {host}:\n\n```\n{cmd.strip()}\n```\n\n{table}\n{MARK_END}"
        text = a.write_docs.read_text() if a.write_docs.is_file() else ""
        pattern = re.compile(re.escape(MARK_BEGIN) + ".*?" + re.escape(MARK_END), re.S)
        text = pattern.sub(lambda _: block, text) if pattern.search(text) else text + "\n" + block + "\n"
        a.write_docs.write_text(text)


if __name__ == "__main__":
    main()
