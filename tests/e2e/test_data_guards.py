"""Tokenizer guards: a missing tokenizer at shard time and at eval time, and a mixture of sources
built with different tokenizers, each fail with one line that says what to do -- never a
traceback, never a result that silently lacks bits per byte."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from train_utils import REPO, ds_env, run_training

from data_prep.demo_corpus import SmallCorpus, build_test_corpus
from data_prep.shard import ShardParams, build_shards
from data_prep.train_tokenizer import TokenizerParams, train_tokenizer
from mythos.config import ConfigError, from_dict
from mythos.data import DataConfig
from mythos.data.mixture import resolve_data


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=ds_env(), capture_output=True, text=True,
                          timeout=600)


def test_shard_with_missing_tokenizer_is_one_line_exit_2(data_corpus: SmallCorpus, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-tokenizer"
    out = tmp_path / "shards"
    proc = _cli("data_prep.shard", "--tokenizer", str(missing), "--input", str(data_corpus.text_files[0]),
                "--out", str(out), "--seq-len", "32", "--no-progress")
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1, proc.stderr
    assert err[0].startswith("error: cannot load tokenizer") and str(missing) in err[0]
    assert not out.exists()  # nothing written


def test_mixture_of_two_tokenizers_is_refused_naming_both(data_corpus: SmallCorpus, tmp_path: Path) -> None:
    files = data_corpus.text_files
    other_tok = tmp_path / "tok2"  # same vocab size, other training text: another tokenizer
    train_tokenizer(files[3:5], other_tok, TokenizerParams(vocab_size=1024, model_type="bpe"))
    p = ShardParams(seq_len=32, shard_tokens=8192, val_fraction=0.05)
    a, b = tmp_path / "a" / "shards", tmp_path / "b" / "shards"
    build_shards(data_corpus.tokenizer_dir, files[0:2], a, p, progress=False)
    build_shards(other_tok, files[2:4], b, p, progress=False)
    cfg = from_dict(DataConfig, {"sources": [{"shards": str(a), "weight": 1.0}, {"shards": str(b), "weight": 1.0}]})
    with pytest.raises(ConfigError) as err:
        resolve_data(cfg)
    msg = str(err.value)
    assert "\n" not in msg and "tokenizer_sha256" in msg and str(a) in msg and str(b) in msg, msg


@pytest.mark.slow
def test_eval_with_a_moved_tokenizer_fails_or_is_pointed_or_skips_explicitly(tmp_path: Path) -> None:
    """bpb never goes missing silently: without the tokenizer the eval stops with one line naming
    it and both ways out; ``--tokenizer`` finds it again (same bpb as before the move);
    ``--no-bpb`` records the skip."""
    corpus = build_test_corpus(tmp_path / "corpus", max_bytes=300_000)
    run = tmp_path / "run"
    run_training("configs/run/dense-tiny-cpu.yaml", run, corpus.shards_dir,
                 ["train.max_steps=2", "train.save_interval=2"])
    base = ["mythos.eval", "--run", str(run), "--max-batches", "2", "--device", "cpu", "--quiet"]
    before = _cli(*base, "--out", str(tmp_path / "before.json"))
    assert before.returncode == 0, before.stderr
    bpb = json.loads((tmp_path / "before.json").read_text())["lm"]["bpb"]
    assert bpb is not None

    moved = tmp_path / "elsewhere"
    shutil.move(corpus.tokenizer_dir, moved)
    proc = _cli(*base, "--out", str(tmp_path / "missing.json"))
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1, proc.stderr
    assert str(corpus.tokenizer_dir) in err[0] and "--tokenizer PATH" in err[0] and "--no-bpb" in err[0], err
    assert not (tmp_path / "missing.json").exists()

    proc = _cli(*base, "--tokenizer", str(moved), "--out", str(tmp_path / "pointed.json"))
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "pointed.json").read_text())["lm"]["bpb"] == bpb

    proc = _cli(*base, "--no-bpb", "--out", str(tmp_path / "skipped.json"))
    assert proc.returncode == 0, proc.stderr
    lm = json.loads((tmp_path / "skipped.json").read_text())["lm"]
    assert lm["bpb"] is None and lm["bpb_method"] == "unavailable: skipped with --no-bpb"
