"""mythos.eval: exact bits-per-byte accounting, ``python -m mythos.eval`` on a real short run
(loss / ppl / bpb per loop count, results.json), multi-hop scoring, one-line errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_utils import REPO, ds_env

from mythos.data import Tokenizer, load_manifest
from mythos.eval.multihop import evaluate_multihop
from mythos.model import ModelConfig
from mythos.train.evaluate import TokenBytes

pytest_plugins = ["data_fixtures", "eval_fixtures"]


def test_token_bytes_are_exact_on_packed_documents(data_corpus) -> None:
    """Summed over ``doc EOS doc EOS ...`` labels, the byte counts equal the documents' UTF-8 bytes
    (the dummy-prefix space of each document start is not counted)."""
    tok = Tokenizer(data_corpus.tokenizer_model)
    table, dummy = tok.byte_lengths()
    tb = TokenBytes(torch.from_numpy(table), tok.eos_id, dummy)
    docs = ["Hello world", " leading space", "tab\there\n\nnew", "ünïcödé ✓ 漢字", "x", "\nstart", "end  "]
    stream = [tok.eos_id]  # the stream before the first document ends a previous one
    for d in docs:
        stream += tok.encode(d) + [tok.eos_id]
    ids = torch.tensor(stream)
    n = tb.count(ids[None, :-1], ids[None, 1:])
    assert int(n) == sum(len(d.encode("utf-8")) for d in docs)
    masked = ids[None, 1:].clone()
    masked[0, :3] = -100  # ignored labels count nothing
    assert int(tb.count(ids[None, :-1], masked)) < int(n)


def test_token_bytes_found_from_manifest(data_corpus) -> None:
    tb = TokenBytes.for_shards(data_corpus.shards_dir)
    assert tb is not None and tb.dummy_prefix
    man = load_manifest(data_corpus.shards_dir)
    assert man.raw["tokenizer"]["sha256"] == Tokenizer(data_corpus.tokenizer_model).sha256


def test_eval_cli_on_real_run(short_runs, tmp_path: Path) -> None:
    run = short_runs["rdt"]
    proc = subprocess.run([sys.executable, "-m", "mythos.eval", "--run", str(run), "--loops", "1,8", "--batch-size",
                           "64"], cwd=REPO, env=ds_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((run / "eval" / "results.json").read_text())
    assert res["checkpoint"] == "step0000004" and res["kind"] == "rdt" and res["step"] == 4
    lm = res["lm"]
    assert set(lm["by_loops"]) == {"1", "4", "8"}  # requested + the default depth (loops.mean=4)
    assert lm["loss"] == lm["by_loops"]["4"]["loss"] and math.isclose(lm["ppl"], math.exp(lm["loss"]))
    # bpb = nats / ln 2 / bytes: consistent with the manifest's average bytes per token
    bpt = load_manifest(_shards(run)).raw["splits"]["val"]["bytes_per_token"]
    assert lm["bpb"] == pytest.approx(lm["loss"] / math.log(2) / (lm["bytes"] / lm["tokens"]))
    assert lm["bytes"] / lm["tokens"] == pytest.approx(bpt, rel=0.05)
    assert res["data_fingerprint"] == json.loads((run / "run_info.json").read_text())["data_fingerprint"]
    # training's periodic eval logged the same metric family, bpb included
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("val/bpb" in r and "val/loss@1" in r for r in rows)

    dense = subprocess.run([sys.executable, "-m", "mythos.eval", "--run", str(short_runs["dense"]), "--batch-size",
                            "64", "--out", str(tmp_path / "d.json")], cwd=REPO, env=ds_env(), capture_output=True,
                           text=True, timeout=300)
    assert dense.returncode == 0, dense.stderr[-2000:]
    d = json.loads((tmp_path / "d.json").read_text())
    assert d["kind"] == "dense" and "by_loops" not in d["lm"] and d["lm"]["bpb"] > 0


def _shards(run: Path) -> Path:
    from mythos.eval.loading import load_run_config_from_dir

    return Path(load_run_config_from_dir(run).data.shards)


def test_eval_cli_errors_are_one_line(tmp_path: Path, short_runs) -> None:
    for args in (["--run", str(tmp_path)], ["--run", str(short_runs["rdt"]), "--checkpoint", "step9999999"],
                 ["--run", str(short_runs["rdt"]), "--loops", "0,2"]):
        proc = subprocess.run([sys.executable, "-m", "mythos.eval", *args], cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, args


class _Oracle(torch.nn.Module):
    """Answers correctly iff the (fake) loop count reaches the query's hop count: exercises the
    per-loop, per-hop bookkeeping of evaluate_multihop without training."""

    def __init__(self, answers: dict[tuple[int, ...], list[int]], hops: dict[tuple[int, ...], int]) -> None:
        super().__init__()
        self.cfg = ModelConfig(kind="rdt", n_core=1, vocab_size=64, max_seq_len=32)
        self.answers, self.hops = answers, hops

    def generate(self, ids: torch.Tensor, n: int, num_loops: int = 1, **_) -> torch.Tensor:
        rows = []
        for row in ids.tolist():
            ans = self.answers[tuple(row)] if num_loops >= self.hops[tuple(row)] else [0] * n
            rows.append(row + ans[:n])
        return torch.tensor(rows)


def test_multihop_scoring_per_hop_and_loop() -> None:
    examples = [{"hops": h, "prompt_ids": [1, 10 + i, *([20] * h), 30], "answer_ids": [40 + i % 3]}
                for h in (1, 2, 4) for i in range(5)]
    model = _Oracle({tuple(e["prompt_ids"]): e["answer_ids"] for e in examples},
                    {tuple(e["prompt_ids"]): e["hops"] for e in examples})
    res = evaluate_multihop(model, examples, loops=[1, 2, 4], batch_size=3)
    assert res["count"] == {"1": 5, "2": 5, "4": 5}
    assert res["accuracy"] == {"1": {"1": 1.0, "2": 0.0, "4": 0.0}, "2": {"1": 1.0, "2": 1.0, "4": 0.0},
                               "4": {"1": 1.0, "2": 1.0, "4": 1.0}}
    with pytest.raises(ValueError, match="max_seq_len"):
        evaluate_multihop(model, [{"hops": 1, "prompt_ids": [1] * 40, "answer_ids": [2]}])
