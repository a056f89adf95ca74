"""data_prep: tokenizer training, sharding, determinism, resume and bad-input handling."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_prep import shard, train_tokenizer
from data_prep.common import run_cli, sha256_file
from data_prep.demo_corpus import SmallCorpus, write_text_slice
from data_prep.sources import SourceOptions, iter_documents
from data_prep.tokenize_workers import is_val_document
from mythos.data import PackedSamples, Tokenizer, load_manifest, shard_writer

REPO = Path(__file__).resolve().parents[2]


def cli(capsys: pytest.CaptureFixture, module, *args: str) -> tuple[int, str]:
    """Run a data_prep CLI in-process; return (exit code, stderr)."""
    capsys.readouterr()
    rc = run_cli(module.main, [str(a) for a in args])
    return rc, capsys.readouterr().err


def assert_one_line_error(rc: int, err: str, *needles: str) -> None:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert rc != 0
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]


def assert_nothing_half_written(out: Path) -> None:
    if out.exists():
        assert not (out / "manifest.json").exists()
        assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))


@pytest.fixture(scope="module")
def small_text(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """~150 kB slice: quick to shard in per-test builds."""
    return write_text_slice(tmp_path_factory.mktemp("small_text"), 150_000)


def shard_args(corpus: SmallCorpus, inputs, out: Path, *extra: str) -> list[str]:
    return [
        "--tokenizer",
        corpus.tokenizer_dir,
        "--input",
        *inputs,
        "--out",
        out,
        "--seq-len",
        "32",
        "--shard-tokens",
        "4096",
        "--val-fraction",
        "0.05",
        "--no-progress",
        *extra,
    ]


# ---- tokenizer --------------------------------------------------------------------------------


def test_tokenizer_card_and_determinism(data_corpus: SmallCorpus, tmp_path: Path, capsys) -> None:
    card = json.loads((data_corpus.tokenizer_dir / "card.json").read_text())
    assert card["vocab_size"] == 1024
    assert (card["unk_id"], card["bos_id"], card["eos_id"], card["pad_id"]) == (0, 1, 2, 3)
    assert card["sha256"] == sha256_file(data_corpus.tokenizer_model)
    assert [i["path"] for i in card["inputs"]] == [p.as_posix() for p in data_corpus.text_files]
    # same inputs + flags -> byte-identical model; special tokens get ids
    rc, _ = cli(
        capsys, train_tokenizer, "--input", *data_corpus.text_files, "--vocab-size", "1024", "--out", tmp_path / "a"
    )
    assert rc == 0
    assert sha256_file(tmp_path / "a" / "tokenizer.model") == card["sha256"]
    rc, _ = cli(
        capsys,
        train_tokenizer,
        "--input",
        data_corpus.text_files[0],
        "--vocab-size",
        "600",
        "--out",
        tmp_path / "b",
        "--special",
        "<|user|>",
        "--model-type",
        "unigram",
    )
    assert rc == 0
    card_b = json.loads((tmp_path / "b" / "card.json").read_text())
    tok = Tokenizer(tmp_path / "b")
    assert card_b["special_tokens"]["<|user|>"] == tok.sp.piece_to_id("<|user|>") > 3
    assert card_b["special_tokens"]["<|user|>"] in tok.encode("say <|user|> once")  # never split


def test_tokenizer_round_trips_exactly(data_corpus: SmallCorpus) -> None:
    tok = Tokenizer(data_corpus.tokenizer_dir)
    for text in ["  two  spaces\n\nand\ttabs ", "ünïcödé 日本語 🎭 — byte fallback", "**HAMLET**  \nTo be"]:
        assert tok.decode(tok.encode(text)) == text
    assert 1.5 < tok.bytes_per_token(["To be, or not to be, that is the question."]) < 6


# ---- sharding ---------------------------------------------------------------------------------


def _expected_docs(files, split: str, frac: float, seed: int = 0) -> list[str]:
    key = seed.to_bytes(8, "little", signed=True)
    docs = [d for f in files for d in iter_documents(f, SourceOptions())]
    return [d for d in docs if is_val_document(d.encode(), frac, key) == (split == "val")]


def test_round_trip_text_to_shards_to_text(data_corpus: SmallCorpus) -> None:
    """Decoding the stored token stream gives back the input documents, in order, per split."""
    m = load_manifest(data_corpus.shards_dir)
    tok = Tokenizer(data_corpus.tokenizer_dir)
    for split in ("train", "val"):
        samples = PackedSamples(m, split)
        stream = np.concatenate([samples[g] for g in range(len(samples))])
        pieces = np.split(stream, np.flatnonzero(stream == m.eos_id) + 1)
        decoded = [tok.decode(p[:-1]) for p in pieces[:-1]]  # complete documents (end in EOS)
        expected = _expected_docs(data_corpus.text_files, split, 0.02)
        assert len(decoded) >= len(expected) - 3  # only the dropped tail may be missing
        assert decoded == expected[: len(decoded)]
        assert expected[len(decoded)].startswith(tok.decode(pieces[-1]))  # partial last document
        assert m.raw["splits"][split]["samples"] == len(samples)


def test_shards_are_webdataset_readable(data_corpus: SmallCorpus) -> None:
    import webdataset as wds

    m = load_manifest(data_corpus.shards_dir)
    first = m.split_shards("train")[0]
    ds = wds.WebDataset(str(m.directory / first.name), shardshuffle=False).decode()
    rows = list(ds)
    assert len(rows) == first.num_samples
    assert rows[0]["__key__"] == "train-00000/00000000"
    arr = rows[0]["tokens.npy"]
    assert arr.dtype == np.uint16 and arr.shape == (m.seq_len + 1,)
    np.testing.assert_array_equal(arr, PackedSamples(m, "train")[0])


def test_deterministic_and_worker_count_independent(data_corpus, small_text, tmp_path, capsys) -> None:
    outs = []
    for i, workers in enumerate((1, 2, 1)):
        out = tmp_path / f"o{i}"
        rc, _ = cli(capsys, shard, *shard_args(data_corpus, small_text, out, "--workers", str(workers)))
        assert rc == 0
        outs.append(out)
    names = sorted(p.name for p in outs[0].iterdir())
    assert any(n.startswith("val-") for n in names) and len(names) > 3
    for other in outs[1:]:
        assert sorted(p.name for p in other.iterdir()) == names
        for n in names:
            assert (other / n).read_bytes() == (outs[0] / n).read_bytes(), n


def test_rerun_skips_and_interrupted_run_resumes(data_corpus, small_text, tmp_path, capsys, monkeypatch) -> None:
    out = tmp_path / "o"
    args = shard_args(data_corpus, small_text, out, "--workers", "1")
    rc, err = cli(capsys, shard, *args)
    assert rc == 0
    reference = {p.name: p.read_bytes() for p in out.iterdir()}
    rc, err = cli(capsys, shard, *args)
    assert rc == 0 and "up to date" in err

    # Interrupt after two shards: complete shards under final names, no manifest, no temp files.
    shutil.rmtree(out)
    real_write, calls = shard_writer.atomic_write_bytes, []

    def flaky(path, data):
        if Path(path).suffix == ".tar" and len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(path)
        real_write(path, data)

    monkeypatch.setattr(shard_writer, "atomic_write_bytes", flaky)
    rc, err = cli(capsys, shard, *args)
    assert rc == 130 and "re-run" in err
    assert_nothing_half_written(out)
    assert len(list(out.glob("*.tar"))) == 2
    monkeypatch.setattr(shard_writer, "atomic_write_bytes", real_write)
    rc, err = cli(capsys, shard, *args)
    assert rc == 0 and "2 already complete" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == reference


def test_jsonl_gz_and_txt_gz_inputs(data_corpus, tmp_path, capsys) -> None:
    docs = ["First document.\nWith two lines.", "Second — ünïcode.", "Third " * 40]
    (tmp_path / "in").mkdir()
    with gzip.open(tmp_path / "in" / "a.jsonl.gz", "wt") as f:
        for d in docs:
            f.write(json.dumps({"content": d}) + "\n\n")
    with gzip.open(tmp_path / "in" / "b.txt.gz", "wt") as f:
        f.write("\n\n".join(docs) + "\n")
    out = tmp_path / "o"
    rc, err = cli(
        capsys,
        shard,
        "--tokenizer",
        data_corpus.tokenizer_model,
        "--input",
        tmp_path / "in",
        "--out",
        out,
        "--seq-len",
        "8",
        "--val-fraction",
        "0",
        "--text-field",
        "content",
        "--no-progress",
    )
    assert rc == 0, err
    m = load_manifest(out)
    assert [i["documents"] for i in m.raw["inputs"]] == [3, 3]
    s = PackedSamples(m, "train")
    stream = np.concatenate([s[g] for g in range(len(s))])
    tok = Tokenizer(data_corpus.tokenizer_dir)
    pieces = np.split(stream, np.flatnonzero(stream == m.eos_id) + 1)
    assert [tok.decode(p[:-1]) for p in pieces[:5]] == (docs + docs)[:5]
    assert docs[2].startswith(tok.decode(pieces[5]))  # the tail shorter than a sample is dropped


# ---- bad input: one-line error, non-zero exit, nothing half-written ---------------------------


def test_missing_input(data_corpus, tmp_path, capsys) -> None:
    rc, err = cli(capsys, shard, *shard_args(data_corpus, [tmp_path / "nope.txt"], tmp_path / "o"))
    assert_one_line_error(rc, err, "input not found", "nope.txt")
    assert not (tmp_path / "o").exists()
    rc, err = cli(
        capsys, train_tokenizer, "--input", tmp_path / "nope.txt", "--vocab-size", "300", "--out", tmp_path / "t"
    )
    assert_one_line_error(rc, err, "nope.txt")
    assert not (tmp_path / "t").exists()


def test_empty_corpus(data_corpus, tmp_path, capsys) -> None:
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    (tmp_path / "tiny.txt").write_text("a few words\n")
    rc, err = cli(capsys, shard, *shard_args(data_corpus, [tmp_path / "empty.txt"], tmp_path / "o"))
    assert_one_line_error(rc, err, "empty corpus")
    assert_nothing_half_written(tmp_path / "o")
    rc, err = cli(capsys, shard, *shard_args(data_corpus, [tmp_path / "tiny.txt"], tmp_path / "o2"))
    assert_one_line_error(rc, err, "empty corpus", "seq_len")
    assert_nothing_half_written(tmp_path / "o2")
    rc, err = cli(
        capsys, train_tokenizer, "--input", tmp_path / "empty.txt", "--vocab-size", "300", "--out", tmp_path / "t"
    )
    assert_one_line_error(rc, err, "empty corpus")


def test_bad_utf8(data_corpus, small_text, tmp_path, capsys) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"Good paragraph.\n\nBad \xff\xfe bytes here.\n\nFine again.\n")
    rc, err = cli(capsys, shard, *shard_args(data_corpus, [*small_text, bad], tmp_path / "o"))
    assert_one_line_error(rc, err, str(bad), "byte offset 21", "--on-bad-utf8")
    assert_nothing_half_written(tmp_path / "o")
    for mode, docs in (("replace", 3), ("skip", 2)):
        out = tmp_path / mode
        rc, err = cli(capsys, shard, *shard_args(data_corpus, [*small_text, bad], out, "--on-bad-utf8", mode))
        assert rc == 0, err
        assert load_manifest(out).raw["inputs"][-1]["documents"] == docs


def test_jsonl_missing_field(data_corpus, tmp_path, capsys) -> None:
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    rc, err = cli(capsys, shard, *shard_args(data_corpus, [f], tmp_path / "o"))
    assert_one_line_error(rc, err, f"{f}:2", "'text'", "--text-field")
    assert_nothing_half_written(tmp_path / "o")


def test_vocab_exceeding_dtype(data_corpus, small_text, tmp_path, capsys) -> None:
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(data_corpus.tokenizer_model.read_bytes())
    for i in range(70_000 - len(proto.pieces)):
        proto.pieces.add(piece=f"<extra_{i}>", score=0.0, type=pb.ModelProto.SentencePiece.USER_DEFINED)
    big = tmp_path / "big.model"
    big.write_bytes(proto.SerializeToString())
    args = ["--tokenizer", big, "--input", small_text[0], "--seq-len", "32", "--no-progress"]
    rc, err = cli(capsys, shard, *args, "--out", tmp_path / "o", "--dtype", "uint16")
    assert_one_line_error(rc, err, "70000", "uint16", "uint32")
    assert not (tmp_path / "o").exists()
    rc, err = cli(capsys, shard, *args, "--out", tmp_path / "o32")  # auto -> uint32
    assert rc == 0, err
    m = load_manifest(tmp_path / "o32")
    assert m.dtype == "uint32" and PackedSamples(m, "train")[0].dtype == np.uint32


def test_refuses_output_of_a_different_build(data_corpus, small_text, tmp_path, capsys) -> None:
    out = tmp_path / "o"
    assert cli(capsys, shard, *shard_args(data_corpus, small_text, out))[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    rc, err = cli(capsys, shard, *shard_args(data_corpus, small_text, out, "--seed", "7"))
    assert_one_line_error(rc, err, str(out), "different build", "params", "--overwrite")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    rc, err = cli(capsys, shard, *shard_args(data_corpus, small_text[:1], out, "--seed", "7", "--overwrite"))
    assert rc == 0, err
    assert load_manifest(out).raw["build"]["params"]["seed"] == 7


def test_cli_subprocess_exit_code_and_single_line(tmp_path) -> None:
    """The real entry point: exit status 2, exactly one stderr line."""
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "data_prep.shard",
            "--tokenizer",
            str(tmp_path),
            "--input",
            str(tmp_path / "x.txt"),
            "--out",
            str(tmp_path / "o"),
            "--seq-len",
            "8",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: input not found")
