"""mythos.eval: exact bits-per-byte accounting, ``python -m mythos.eval`` on a real short run
(loss / ppl / bpb per loop count, results.json), multi-hop scoring, one-line errors."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_utils import REPO, ds_env, unwritable

from mythos.data import Tokenizer, load_manifest
from mythos.eval.multihop import evaluate_multihop
from mythos.model import ModelConfig
from mythos.train.evaluate import TokenBytes


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
    # the cost of a loop sweep is said up front (issue 24: 8+ minutes on CPU without a word)
    assert "eval: 3 passes over 3 batches at T=1,4,8: 13 core iterations per batch (13x the T=1 pass); on CPU " \
        "pass e.g. --loops 1,4 for a quick look" in proc.stderr, proc.stderr[-2000:]
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


def test_eval_cli_errors_are_one_line(tmp_path: Path, short_runs, capsys: pytest.CaptureFixture[str]) -> None:
    """Every bad input -- run dir, checkpoint, loops, device, dtype, argparse usage, task dir -- is
    one ``error:`` line on stderr and exit code 2, before any weights load."""
    rdt = str(short_runs["rdt"])
    no_ckpt = tmp_path / "no_ckpt"  # a run directory whose training never saved
    no_ckpt.mkdir()
    shutil.copy(short_runs["rdt"] / "config.resolved.yaml", no_ckpt)
    cases = [["--run", str(tmp_path)], ["--run", str(no_ckpt)], ["--run", rdt, "--checkpoint", "step9999999"],
             ["--run", rdt, "--loops", "0,2"], ["--run", rdt, "--loops", "a"], ["--run", rdt, "--device", "tpu"],
             ["--run", rdt, "--dtype", "float16"], ["--run", rdt, "--batch-size", "x"], ["--loops", "1"],
             ["--run", rdt, "--multihop", str(tmp_path / "no_task")]]
    if not torch.cuda.is_available():
        cases.append(["--run", rdt, "--device", "cuda"])
    from mythos.eval.cli import main

    for args in cases:  # the command's own main() in this process: ~4 s of imports saved per case
        capsys.readouterr()
        try:
            code = main(args)
        except SystemExit as exc:  # argparse-level refusals exit from inside main()
            code = exc.code
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, (args, err[-2000:])
    if not torch.cuda.is_available():
        assert "use --device cpu" in err


def test_eval_refuses_a_foreign_checkpoint_and_an_unwritable_results_dir(short_runs, tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 24: an RDT export handed to the dense run was evaluated and written into the dense
    run's eval/ as the dense model; and a read-only run evaluated for minutes before failing to
    write. Both are one line, exit 2, before any evaluation, and nothing is written."""
    from mythos.eval.cli import main
    from mythos.eval.loading import load_run
    from mythos.weights import save_consolidated

    rdt = load_run(short_runs["rdt"])
    export = save_consolidated(rdt.model, rdt.cfg.model, tmp_path / "rdt-export")
    dense = tmp_path / "dense"
    shutil.copytree(short_runs["dense"], dense, ignore=shutil.ignore_patterns("eval"))
    before = sorted(p.relative_to(dense) for p in dense.rglob("*"))
    capsys.readouterr()  # the set-up's own progress lines
    foreign = [["--checkpoint", str(export)], ["--checkpoint", str(short_runs["rdt"] / "checkpoints" / "step0000004")]]
    for args, want in zip(foreign, ("model.kind: 'rdt' there, 'dense' in the run", "does not match")):
        assert main(["--run", str(dense), *args, "--max-batches", "1", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: checkpoint ") and err.count("\n") == 1 and want in err, err
        assert "pass --run the run it came from" in err
    assert sorted(p.relative_to(dense) for p in dense.rglob("*")) == before  # no eval/ written
    with unwritable(dense / "eval"):
        assert main(["--run", str(dense), "--max-batches", "1", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: the results directory (RUN/eval; or pass --out) {dense / 'eval'} is not "
                              "writable") and err.count("\n") == 1, err
        assert not (dense / "eval" / "results.json").exists()
    assert main(["--run", str(dense), "--max-batches", "1", "--quiet"]) == 0  # the run's own checkpoint: fine


def _reference_lm(run_dir: Path, loops: list[int], batch_size: int) -> dict[str, float]:
    """The val pass exactly as ``mythos.eval`` ran it before --device/--dtype existed: fp32 model
    on the CPU, the plain val loader, :func:`mythos.train.evaluate.evaluate`."""
    from mythos.data import build_val_loader
    from mythos.eval.loading import load_run
    from mythos.train.evaluate import evaluate

    run = load_run(run_dir)
    val = build_val_loader(run.cfg.data, batch_size)
    return evaluate(run.model, lambda: iter(val), run.cfg.model, torch.device("cpu"), loops=loops,
                    token_bytes=TokenBytes.for_shards(run.cfg.data.shards))


def test_eval_cpu_fp32_reproduces_reference_and_bf16_is_close(short_runs, tmp_path: Path) -> None:
    """``--device cpu --dtype float32`` gives bit-identical loss/bpb to the pre-flag code path, with
    progress lines per loop count on stderr; bf16 is really used and stays close."""
    run = short_runs["rdt"]
    ref = _reference_lm(run, [1, 8], 64)
    proc = subprocess.run([sys.executable, "-m", "mythos.eval", "--run", str(run), "--loops", "1,8", "--batch-size",
                           "64", "--device", "cpu", "--dtype", "float32", "--out", str(tmp_path / "fp32.json")],
                          cwd=REPO, env=ds_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    fp32 = json.loads((tmp_path / "fp32.json").read_text())
    assert fp32["device"] == "cpu" and fp32["dtype"] == "float32"
    lm = fp32["lm"]
    assert (lm["loss"], lm["bpb"], lm["tokens"]) == (ref["val/loss"], ref["val/bpb"], ref["val/tokens"])
    for t in ("1", "4", "8"):
        assert (lm["by_loops"][t]["loss"], lm["by_loops"][t]["bpb"]) == (ref[f"val/loss@{t}"], ref[f"val/bpb@{t}"])
    n = -(-lm["samples"] // 64)
    for t in (1, 4, 8):  # one pass per loop count, each reported to its end
        assert f"eval T={t}: {n}/{n} batches" in proc.stderr

    from mythos.eval.cli import run_eval

    bf16 = run_eval(run, loops=[1, 8], batch_size=64, device="cpu", dtype="bfloat16", out=tmp_path / "bf16.json")
    assert bf16["dtype"] == "bfloat16" and bf16["lm"]["tokens"] == lm["tokens"]
    assert bf16["lm"]["loss"] != lm["loss"]  # the model really ran in bf16 ...
    for t in ("1", "4", "8"):  # ... and bf16 rounding moves the loss by well under 1%
        assert bf16["lm"]["by_loops"][t]["loss"] == pytest.approx(lm["by_loops"][t]["loss"], rel=1e-2)
        assert bf16["lm"]["by_loops"][t]["bpb"] == pytest.approx(lm["by_loops"][t]["bpb"], rel=1e-2)


def test_device_and_dtype_resolution() -> None:
    from mythos.config import ConfigError
    from mythos.eval.device import resolve

    cuda = torch.cuda.is_available()
    assert resolve(None, None) == ((torch.device("cuda"), torch.bfloat16) if cuda
                                   else (torch.device("cpu"), torch.float32))
    assert resolve("cpu", "bf16") == (torch.device("cpu"), torch.bfloat16)
    assert resolve("cpu", "float32") == (torch.device("cpu"), torch.float32)
    for device, dtype in (("tpu", None), ("cpu", "float16"), ("cpu", "int8"), ("cuda:x", None)):
        with pytest.raises(ConfigError):
            resolve(device, dtype)
    if not cuda:
        with pytest.raises(ConfigError, match="CUDA is not available; use --device cpu"):
            resolve("cuda", None)


def _khop_task(out: Path) -> Path:
    """A tiny k-hop task (vocab 41, 9 positions: fits the tiny runs' 1024-token, 64-position model)."""
    subprocess.run([sys.executable, "-m", "mythos.tasks", "--out", str(out), "test_hops=[1,2,3]", "train_per_hop=4",
                    "val_per_hop=2", "test_per_hop=5", "fact_repeats=1"], cwd=REPO, check=True, capture_output=True)
    return out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_eval_cli_on_cuda(short_runs, tmp_path: Path) -> None:
    """``--device cuda`` (default bf16, and fp32) on the fixture run: val pass plus multi-hop; the
    fp32 numbers match the CPU's to round-off, bf16 within 1%."""
    run, task = short_runs["rdt"], _khop_task(tmp_path / "khop")
    out = {}
    for device, dtype in (("cpu", "float32"), ("cuda", None), ("cuda", "float32")):
        path = tmp_path / f"{device}-{dtype}.json"
        args = ["--run", str(run), "--loops", "1,8", "--batch-size", "64", "--multihop", str(task), "--out", str(path),
                "--device", device] + (["--dtype", dtype] if dtype else [])
        proc = subprocess.run([sys.executable, "-m", "mythos.eval", *args], cwd=REPO, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        out[device, dtype] = json.loads(path.read_text())
    cpu, bf16, fp32 = out["cpu", "float32"], out["cuda", None], out["cuda", "float32"]
    assert bf16["device"].startswith("cuda") and bf16["dtype"] == "bfloat16" and fp32["dtype"] == "float32"
    for t in ("1", "4", "8"):
        assert fp32["lm"]["by_loops"][t]["loss"] == pytest.approx(cpu["lm"]["by_loops"][t]["loss"], rel=1e-4)
        assert bf16["lm"]["by_loops"][t]["bpb"] == pytest.approx(cpu["lm"]["by_loops"][t]["bpb"], rel=1e-2)
    assert set(bf16["multihop"]["accuracy"]) == {"1", "8"} and bf16["multihop"]["count"] == {"1": 5, "2": 5, "3": 5}


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


def test_multihop_batches_match_one_at_a_time_on_a_real_model(short_runs, capsys) -> None:
    """Batched, longest-first multi-hop decoding predicts exactly what one-query-at-a-time greedy
    decoding does: with those predictions as the answers, every query scores 1.0."""
    from mythos.eval.loading import load_run

    model = load_run(short_runs["rdt"], device="cpu", dtype=torch.float32).model
    g = torch.Generator().manual_seed(0)
    examples = []
    for i in range(14):  # interleaved (prompt, answer) lengths: groups of 4, 4, 3, 3 -> ragged batches of 3
        prompt = torch.randint(2, model.cfg.vocab_size, (3 + i % 4,), generator=g).tolist()
        n_answer = 1 + i % 2
        ans = model.generate(torch.tensor([prompt]), n_answer, num_loops=2)[0, len(prompt):].tolist()
        examples.append({"hops": 1 + i % 3, "prompt_ids": prompt, "answer_ids": ans})
    res = evaluate_multihop(model, examples, loops=[2], batch_size=3, quiet=False)
    assert res["accuracy"] == {"2": {"1": 1.0, "2": 1.0, "3": 1.0}}
    n_batches = sum(-(-c // 3) for c in (4, 4, 3, 3))  # (prompt len, answer len) groups of 4, 4, 3, 3 queries
    assert f"multihop T=2: {n_batches}/{n_batches} batches" in capsys.readouterr().err
