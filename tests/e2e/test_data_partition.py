"""Partitioned data prep: N processes (or SLURM array tasks) + merge == one process; parquet and
.zst inputs; filters; merge refuses missing/corrupt partitions and names them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from data_prep import merge, shard
from data_prep.common import run_cli
from data_prep.demo_corpus import SmallCorpus
from data_prep.partition import DocFilter, assign_units, plan_units
from data_prep.sources import SourceOptions, iter_documents
from mythos.data import DataConfig, PackedSamples, Tokenizer, build_train_loader, load_manifest

REPO = Path(__file__).resolve().parents[2]
N = 3


def tree(d: Path) -> dict[str, bytes]:
    """Every file under ``d`` (relative path -> bytes), loader index caches excluded."""
    return {
        p.relative_to(d).as_posix(): p.read_bytes()
        for p in sorted(d.rglob("*"))
        if p.is_file() and not p.name.endswith(".idx.npy")
    }


def decoded_stream(out: Path, split: str, tok: Tokenizer) -> list[list[str]]:
    """Complete documents of a split per partition (one list for a classic build), in stored
    order. Each partition packs its own stream, so a document cut by a partition's dropped tail
    is incomplete: only EOS-terminated pieces after the first EOS of a partition are whole."""
    m = load_manifest(out)
    s = PackedSamples(m, split)
    groups: dict[str, list[int]] = {}
    g = 0
    for info in m.split_shards(split):
        key = info.name.split("-")[1] if info.name.count("-") == 2 else ""
        groups.setdefault(key, []).extend(range(g, g + info.num_samples))
        g += info.num_samples
    out_docs = []
    for idx in groups.values():
        stream = np.concatenate([s[i] for i in idx])
        pieces = np.split(stream, np.flatnonzero(stream == m.eos_id) + 1)
        out_docs.append([tok.decode(p[:-1]) for p in pieces[:-1]])
    return out_docs


@pytest.fixture(scope="module")
def mixed_inputs(data_corpus: SmallCorpus, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """~300 kB in four formats: plain text (split into byte ranges), jsonl, jsonl.zst, parquet
    with several row groups; with duplicated and very short documents for the filters."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    d = tmp_path_factory.mktemp("mixed")
    paras = [p for f in data_corpus.text_files[:3] for p in iter_documents(f, SourceOptions())]
    (d / "a.txt").write_text("\n\n".join(paras[:1500]) + "\n")
    jl = "".join(json.dumps({"body": t}) + "\n" for t in paras[1500:2300] + paras[:40] + ["ok"] * 5)
    (d / "b.jsonl").write_text(jl)
    half = jl[: jl.index("\n", len(jl) // 2) + 1]  # whole lines only
    (d / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(half.encode()))
    rows = paras[2300:3300] + [None, ""] + paras[100:120]
    pq.write_table(pa.table({"id": list(range(len(rows))), "body": rows}), d / "d.parquet", row_group_size=97)
    return [d / "a.txt", d / "b.jsonl", d / "c.jsonl.zst", d / "d.parquet"]


def shard_cli_args(corpus: SmallCorpus, inputs: list[Path], out: Path, *extra: str) -> list[str]:
    return [
        "--tokenizer",
        str(corpus.tokenizer_dir),
        "--input",
        *map(str, inputs),
        "--out",
        str(out),
        "--seq-len",
        "32",
        "--shard-tokens",
        "8192",
        "--val-fraction",
        "0.05",
        "--text-field",
        "body",
        "--unit-bytes",
        "20000",
        "--workers",
        "1",
        "--no-progress",
        *extra,
    ]


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, env=env)


@pytest.fixture(scope="module")
def sequential(data_corpus, mixed_inputs, tmp_path_factory) -> Path:
    """The reference: all N partitions run one after another in this process, then merged."""
    out = tmp_path_factory.mktemp("seq") / "out"
    rc = run_cli(shard.main, shard_cli_args(data_corpus, mixed_inputs, out, "--num-partitions", str(N)))
    assert rc == 0
    return out


def test_units_tile_files_and_assignment_is_balanced(mixed_inputs) -> None:
    units = plan_units(mixed_inputs, 20_000, "paragraph")
    kinds = {u.kind for u in units}
    assert kinds == {"bytes", "file", "row_groups"}
    opts = SourceOptions(text_field="body")
    for i, f in enumerate(mixed_inputs):
        whole = list(iter_documents(f, opts))
        parts = [d for u in units if u.file == i for d in iter_documents(f, opts, span=u.span)]
        assert parts == whole and whole, f  # ranges yield exactly the file's documents, in order
    owners = assign_units(units, N)
    assert owners == sorted(owners) and set(owners) == set(range(N))  # contiguous, none empty
    load = [sum(u.weight for u, o in zip(units, owners) if o == p) for p in range(N)]
    assert max(load) < 1.6 * min(load)


def test_partitions_as_processes_merge_to_sequential_bytes(data_corpus, mixed_inputs, sequential, tmp_path) -> None:
    out = tmp_path / "out"
    args = shard_cli_args(data_corpus, mixed_inputs, out, "--num-partitions", str(N))
    # all partitions at once, as concurrent processes (what N array tasks do)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "data_prep.shard", *args, "--partition", str(i)],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(N)
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    assert not (out / "manifest.json").exists()  # partitions never write the final manifest
    r = run("-m", "data_prep.merge", str(out))
    assert r.returncode == 0, r.stderr
    assert tree(out) == tree(sequential)

    m = load_manifest(out)
    names = [s.name for s in m.shards]
    assert len(set(names)) == len(names) and all(f"-p0000{i}-" in " ".join(names) for i in range(N))
    assert m.raw["partitions"]["num_partitions"] == N
    # the loader sees the same samples in the same order for both directories
    fp = [build_train_loader(DataConfig(shards=str(d)), 8, 8).fingerprint(32) for d in (out, sequential)]
    assert fp[0] == fp[1]


def test_one_partition_equals_classic_build(data_corpus, mixed_inputs, tmp_path) -> None:
    """N=1 reads the same documents in the same order as an unpartitioned build: same samples."""
    a, b = tmp_path / "classic", tmp_path / "n1"
    assert run_cli(shard.main, shard_cli_args(data_corpus, mixed_inputs, a)) == 0
    assert run_cli(shard.main, shard_cli_args(data_corpus, mixed_inputs, b, "--num-partitions", "1")) == 0
    ma, mb = load_manifest(a), load_manifest(b)
    for split in ("train", "val"):
        sa, sb = PackedSamples(ma, split), PackedSamples(mb, split)
        assert len(sa) == len(sb) > 0
        np.testing.assert_array_equal(sa.get_many(range(len(sa))), sb.get_many(range(len(sb))))
    assert [i["documents"] for i in ma.raw["inputs"]] == [i["documents"] for i in mb.raw["inputs"]]


def test_merge_names_missing_or_corrupt_partition_then_rerun_fixes(
    data_corpus, mixed_inputs, sequential, tmp_path, capsys
) -> None:
    out = tmp_path / "out"
    shutil.copytree(sequential, out)
    (out / "manifest.json").unlink()
    reference = tree(sequential)

    def merge_err() -> str:
        capsys.readouterr()
        assert run_cli(merge.main, [str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("error: "), err
        assert not (out / "manifest.json").exists()
        return err

    part1 = out / "partitions" / "p00001.json"
    saved = part1.read_bytes()
    part1.unlink()
    err = merge_err()
    assert "partition 1 of 3 is missing" in err and "--partition 1" in err

    part1.write_text('{"partial_version": 1, "partition": 1')  # truncated JSON
    assert "partition 1" in merge_err() and "corrupt" in merge_err()
    part1.write_bytes(saved)

    victim = next(s for s in json.loads(saved)["shards"] if s["split"] == "train")["name"]
    data = bytearray((out / victim).read_bytes())
    data[1000] ^= 0xFF
    (out / victim).write_bytes(bytes(data))
    err = merge_err()
    assert "partition 1" in err and victim in err and "corrupt" in err
    (out / victim).write_bytes(data[:-512])
    assert "bytes, expected" in merge_err()

    # re-running just that partition repairs it (the others are skipped) and the merge succeeds
    capsys.readouterr()
    args = shard_cli_args(data_corpus, mixed_inputs, out, "--num-partitions", str(N), "--partition", "1")
    assert run_cli(shard.main, args) == 0
    assert run_cli(shard.main, [*args[:-2], "--partition", "0"]) == 0
    assert "partition 0 of 3 already complete" in capsys.readouterr().err
    assert run_cli(merge.main, [str(out)]) == 0
    assert tree(out) == reference


def test_partition_arguments_are_checked(data_corpus, mixed_inputs, tmp_path, capsys) -> None:
    base = shard_cli_args(data_corpus, mixed_inputs, tmp_path / "o")
    for extra, needle in (
        (["--partition", "0"], "--num-partitions"),
        (["--num-partitions", "3", "--partition", "3"], "outside 0..2"),
        (["--num-partitions", "3", "--partition", "0", "--overwrite"], "--overwrite"),
    ):
        capsys.readouterr()
        assert run_cli(shard.main, [*base, *extra]) == 2
        assert needle in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    # partitions of different builds in one directory: the second is refused, naming the directory
    assert run_cli(shard.main, [*base, "--num-partitions", "3", "--partition", "0"]) == 0
    capsys.readouterr()
    assert run_cli(shard.main, [*base, "--num-partitions", "4", "--partition", "1"]) == 2
    assert "different build" in capsys.readouterr().err


def test_parquet_round_trip(data_corpus, tmp_path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = [f"Document {i}: " + "lorem ipsum dolor " * (i % 13 + 1) + "ünïcödé" for i in range(600)]
    rows = docs[:300] + [None] + docs[300:]
    pq.write_table(pa.table({"text": rows, "n": list(range(len(rows)))}), tmp_path / "x.parquet", row_group_size=50)
    assert pq.ParquetFile(tmp_path / "x.parquet").num_row_groups == 13
    out = tmp_path / "o"
    tok = Tokenizer(data_corpus.tokenizer_dir)
    for extra in ([], ["--num-partitions", "3", "--unit-bytes", "4000"]):
        shutil.rmtree(out, ignore_errors=True)
        args = ["--tokenizer", str(data_corpus.tokenizer_dir), "--input", str(tmp_path / "x.parquet"), "--out"]
        rc = run_cli(shard.main, [*args, str(out), "--seq-len", "16", "--val-fraction", "0", "--no-progress", *extra])
        assert rc == 0
        parts = decoded_stream(out, "train", tok)
        assert len(parts) == (3 if extra else 1)
        end = 0
        for got in parts:  # each partition holds the next run of documents, less the one its tail cut
            i = docs.index(got[0])
            assert got == docs[i : i + len(got)] and end <= i <= end + 1
            end = i + len(got)
        assert end >= len(docs) - 1
        assert load_manifest(out).raw["inputs"][0]["documents"] == len(docs)

    # a missing column: one-line error naming the file and the option
    r = run("-m", "data_prep.shard", *args, str(tmp_path / "o2"), "--seq-len", "16", "--text-field", "body")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "x.parquet" in r.stderr and "no column 'body'" in r.stderr and "--text-field" in r.stderr


def test_filters_min_chars_and_dedup_scopes(data_corpus, tmp_path) -> None:
    docs = [f"unique document number {i} " * 3 for i in range(300)]
    body = docs + docs[:100] + ["tiny"] * 20
    files = []
    for k in range(3):  # the duplicates sit in another file than their originals
        f = tmp_path / f"in{k}.jsonl"
        f.write_text("".join(json.dumps({"text": t}) + "\n" for t in body[k * 140 : (k + 1) * 140]))
        files.append(f)
    base = ["--tokenizer", str(data_corpus.tokenizer_dir), "--input", *map(str, files), "--seq-len", "8"]
    base += ["--val-fraction", "0", "--no-progress", "--min-chars", "10", "--unit-bytes", "1000000"]
    kept = {}
    for mode, parts in (("none", "1"), ("partition", "1"), ("partition", "3"), ("global", "3")):
        out = tmp_path / f"{mode}{parts}"
        assert run_cli(shard.main, [*base, "--out", str(out), "--dedup", mode, "--num-partitions", parts]) == 0
        f = load_manifest(out).raw["filters"]
        assert f["dropped_short"] == 20 and f["dedup"] == mode
        kept[mode + parts] = f["kept"]
    assert kept["none1"] == 400
    assert kept["partition1"] == kept["global3"] == 300  # exact over the run
    assert kept["partition3"] == 400  # each file is its own partition: cross-partition copies survive
    # the filter itself: hash assignment splits documents disjointly and dedups exactly
    filters = [DocFilter(0, "global", 3, p) for p in range(3)]
    for t in body:
        [f.keep(t) for f in filters]
    assert sum(f.kept for f in filters) == 301 and sum(f.dropped_duplicate for f in filters) == 119


# ---- SLURM: the real array job + afterok merge on the session's 2-node cluster (conftest.py) ----

def job_state(env: dict, job: str) -> list[str]:
    r = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True, env=env)
    return [w.split("=", 1)[1] for w in r.stdout.split() if w.startswith("JobState=")]


@pytest.mark.slow
def test_slurm_array_and_merge_match_sequential(slurm_cluster, data_corpus, mixed_inputs, sequential, tmp_path):
    out = tmp_path / "out"
    args = shard_cli_args(data_corpus, mixed_inputs, out)
    k = args.index("--workers")
    del args[k : k + 2]  # the sbatch sets --workers from --cpus-per-task
    r = subprocess.run(
        [str(REPO / "launch/slurm/submit_data_prep.sh"), "-n", str(N), "-c", "1", "-t", "10:00"]
        + ["--log-dir", str(tmp_path / "logs"), "--", *args],
        capture_output=True,
        text=True,
        env=slurm_cluster.env,
        cwd=REPO,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    ids = dict(line.split("=") for line in r.stdout.split())
    deadline = time.time() + 240
    while time.time() < deadline:
        states = job_state(slurm_cluster.env, ids["merge_job_id"])
        if states and states[0] not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING"):
            break
        time.sleep(1)
    logs = "\n".join(p.read_text() for p in sorted((tmp_path / "logs").glob("*")))
    assert states == ["COMPLETED"], logs
    assert set(job_state(slurm_cluster.env, ids["array_job_id"])) == {"COMPLETED"}, logs
    assert tree(out) == tree(sequential)
