"""launch/compare.py on two short real runs: report + plots, the identical-data check (refusal
and the labelled override), the TensorBoard fallback and the multi-hop section."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from train_utils import REPO


def _compare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "launch/compare.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def _png_ok(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, path


def test_report_from_two_real_runs(short_runs, tmp_path: Path) -> None:
    rdt, dense = short_runs["rdt"], short_runs["dense"]
    # an eval result for the RDT adds the loss-vs-loops curve from mythos.eval (fake multihop too)
    res = {"checkpoint": "step0000004", "lm": {"loss": 6.9, "ppl": 990.0, "bpb": 4.3,
           "by_loops": {"1": {"loss": 7.0}, "4": {"loss": 6.9}, "16": {"loss": 6.95}}},
           "multihop": {"task": "khop", "train_hops": [1, 2], "count": {"1": 4, "2": 4, "6": 4},
                        "accuracy": {"1": {"1": 0.5, "2": 0.25, "6": 0.0}, "8": {"1": 0.75, "2": 0.5, "6": 0.25}}}}
    copy = tmp_path / "rdt"
    shutil.copytree(rdt, copy, ignore=shutil.ignore_patterns("checkpoints"))
    (copy / "eval").mkdir(exist_ok=True)
    (copy / "eval" / "results.json").write_text(json.dumps(res))
    out = tmp_path / "report"
    proc = _compare(str(copy), str(dense), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    text = (out / "report.md").read_text()
    assert "identical-data comparison" in text and "DIFFERENT" not in text
    assert "rdt-tiny-cpu" in text and "dense-tiny-cpu" in text
    for row in ("parameters", "tokens trained", "training FLOPs", "final val loss", "bpb", "wall time", "MFU"):
        assert row in text, row
    assert "T=1: 7.0000" in text and "| rdt-tiny-cpu | 8 | 0.75 | 0.50 | 0.25 |" in text
    for png in ("loss_vs_tokens", "loss_vs_flops", "loss_vs_wallclock", "loss_vs_loops", "multihop_accuracy"):
        _png_ok(out / f"{png}.png")
        assert f"({png}.png)" in text


def test_different_data_is_refused_then_labelled(short_runs, tmp_path: Path) -> None:
    other = tmp_path / "other"
    shutil.copytree(short_runs["dense"], other, ignore=shutil.ignore_patterns("checkpoints"))
    info = json.loads((other / "run_info.json").read_text())
    info["data_fingerprint"] = "0" * 64
    (other / "run_info.json").write_text(json.dumps(info))
    proc = _compare(str(short_runs["rdt"]), str(other), "--out", str(tmp_path / "r"))
    assert proc.returncode == 2 and proc.stderr.startswith("error: data fingerprints differ")
    assert proc.stderr.count("\n") == 1 and not (tmp_path / "r" / "report.md").exists()
    proc = _compare(str(short_runs["rdt"]), str(other), "--out", str(tmp_path / "r"), "--allow-different-data")
    assert proc.returncode == 0, proc.stderr
    assert "DIFFERENT DATA" in (tmp_path / "r" / "report.md").read_text()


def test_consumed_data_records_are_compared(short_runs, tmp_path: Path) -> None:
    """Same fingerprint is not enough: the runs' consumed.jsonl (running hash of the sample ids
    every step trained on) must agree at every common step; one differing step is refused."""
    proc = _compare(str(short_runs["rdt"]), str(short_runs["dense"]), "--out", str(tmp_path / "ok"))
    assert proc.returncode == 0, proc.stderr
    last = max(json.loads(ln)["step"] for ln in (short_runs["rdt"] / "consumed.jsonl").read_text().splitlines())
    report = (tmp_path / "ok" / "report.md").read_text()
    assert f"consumed the same samples through step {last} (consumed.jsonl)" in report
    other = tmp_path / "other"
    shutil.copytree(short_runs["dense"], other, ignore=shutil.ignore_patterns("checkpoints"))
    rows = [json.loads(ln) for ln in (other / "consumed.jsonl").read_text().splitlines()]
    rows[1]["sha"] = "f" * 64  # as if step rows[1]["step"] had trained on other samples
    (other / "consumed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = _compare(str(short_runs["rdt"]), str(other), "--out", str(tmp_path / "r"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith(f"error: the runs consumed different samples: consumed.jsonl records differ "
                                  f"from step {rows[1]['step']}")


def test_tensorboard_fallback_and_bad_run(short_runs, tmp_path: Path) -> None:
    tb_only = tmp_path / "tb"
    shutil.copytree(short_runs["dense"], tb_only, ignore=shutil.ignore_patterns("checkpoints", "metrics.jsonl"))
    proc = _compare(str(short_runs["rdt"]), str(tb_only), "--out", str(tmp_path / "r"))
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "r" / "report.md").read_text()
    assert "dense-tiny-cpu" in text and "n/a" in text  # MFU is n/a on CPU
    proc = _compare(str(tmp_path / "missing"), str(tb_only), "--out", str(tmp_path / "r2"))
    assert proc.returncode == 2 and "run_info.json not found" in proc.stderr


def test_multihop_pair_section(short_runs, tmp_path: Path) -> None:
    """``--multihop C D``: the depth-extrapolation section is built from C and D's own results
    (their paths, their eval loss in the summary table, their accuracy-per-hop rows), not from the
    main pair's; the main runs carry no multihop results, so nothing there can leak in."""
    pair, results = {}, {"rdt": (5.4321, {"1": {"1": 0.625, "2": 0.375, "6": 0.125},
                                          "8": {"1": 0.875, "2": 0.75, "6": 0.5}}),
                         "dense": (5.8765, {"default": {"1": 0.5, "2": 0.25, "6": 0.0}})}
    for name, (loss, acc) in results.items():
        pair[name] = tmp_path / f"task-{name}"
        shutil.copytree(short_runs[name], pair[name], ignore=shutil.ignore_patterns("checkpoints", "eval"))
        (pair[name] / "eval").mkdir()
        (pair[name] / "eval" / "results.json").write_text(json.dumps({
            "checkpoint": "step0000004", "lm": {"loss": loss, "ppl": 200.0, "bpb": 3.1},
            "multihop": {"task": "khop", "train_hops": [1, 2], "count": {"1": 8, "2": 8, "6": 8}, "accuracy": acc}}))
    proc = _compare(str(short_runs["rdt"]), str(short_runs["dense"]), "--out", str(tmp_path / "r"), "--multihop",
                    str(pair["rdt"]), str(pair["dense"]))
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "r" / "report.md").read_text()
    head, _, section = text.partition("## Depth extrapolation (multi-hop task)")
    assert section, text
    assert f"`{pair['rdt']}` and `{pair['dense']}`" in section and "DIFFERENT DATA" not in section
    eval_row = [ln for ln in section.splitlines() if ln.startswith("| eval val loss (mythos.eval)")]
    assert len(eval_row) == 1 and "5.4321" in eval_row[0] and "5.8765" in eval_row[0], eval_row
    for row in ("| rdt-tiny-cpu | 1 | 0.62 | 0.38 | 0.12 |", "| rdt-tiny-cpu | 8 | 0.88 | 0.75 | 0.50 |",
                "| dense-tiny-cpu | default | 0.50 | 0.25 | 0.00 |"):
        assert row in section, (row, section)
    assert "5.4321" not in head and "0.62" not in head  # the main pair's part has none of it
    _png_ok(tmp_path / "r" / "multihop_accuracy.png")
