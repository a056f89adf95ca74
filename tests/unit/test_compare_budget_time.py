"""mythos.tools.compare on synthetic run directories: wall time and device-hours across resumed
segments (queue gaps excluded, a killed segment ends at its last row, pre-segment records), the
loss-vs-wallclock axis, and the budget check (matched tokens / compute, unmatched refused or
labelled, a run against itself refused)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mythos.tools.compare import main, summarize
from mythos.tools.runs import elapsed, load_run, segments


def make_run(path: Path, *, steps: int, tokens_per_step: int = 100, flops_per_token: float = 6e3,
             times: list[float] | None = None, segs: list[dict[str, Any]] | None = None,
             total_steps: int | None = None, name: str = "run", **info: Any) -> Path:
    """A run dir with one train row per step at ``times[step-1]`` (default 1 s apart from t=1000)."""
    path.mkdir(parents=True)
    times = times or [1000.0 + s for s in range(1, steps + 1)]
    rows = [{"step": s, "time": times[s - 1], "train/loss": 5.0 - 0.01 * s, "train/tokens": s * tokens_per_step,
             "train/flops": s * tokens_per_step * flops_per_token} for s in range(1, steps + 1)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    record = {"name": name, "kind": "dense", "data_fingerprint": "f" * 64, "data_hash": "d" * 64,
              "total_steps": total_steps or steps, "world_size": 2, "start_time": 1000.0, **info}
    if segs is not None:
        record["segments"] = segs
    (path / "run_info.json").write_text(json.dumps(record))
    return path


def test_wall_time_spans_segments_and_skips_the_queue(tmp_path: Path) -> None:
    # segment 1: t=1000..1010 on 2 ranks (recorded end); 1000 s in the queue; segment 2 killed without an
    # end record on 4 ranks, its last row at 2015; segment 3 resumed at 3000 and ended at 3005
    times = [1000.0 + s for s in range(1, 11)] + [2000.0 + 3 * s for s in range(1, 6)] + [3001.0 + s for s in range(4)]
    segs = [{"start_time": 1000.0, "end_time": 1010.0, "world_size": 2},
            {"start_time": 2000.0, "end_time": None, "world_size": 4},
            {"start_time": 3000.0, "end_time": 3005.0, "world_size": 2}]
    run = load_run(make_run(tmp_path / "r", steps=19, times=times, segs=segs))
    got = [(s.start, s.end, s.world_size) for s in segments(run)]
    assert got == [(1000.0, 1010.0, 2), (2000.0, 2015.0, 4), (3000.0, 3005.0, 2)]
    s = summarize(run)
    assert s["wall_s"] == 10 + 15 + 5 and s["segments"] == 3
    assert s["device_hours"] == pytest.approx((10 * 2 + 15 * 4 + 5 * 2) / 3600)
    assert s["tokens_per_wall_s"] == pytest.approx(1900 / 30)
    # the wall-clock axis: monotone, queue gaps removed
    xs = [elapsed(segments(run), r["time"]) for r in run.train]
    assert xs == sorted(xs) and xs[-1] == 10 + 15 + 4 and xs[10] == 10 + 3


def test_a_record_without_segments_is_one_segment(tmp_path: Path) -> None:
    run = load_run(make_run(tmp_path / "old", steps=5))
    assert [(s.start, s.end) for s in segments(run)] == [(1000.0, 1005.0)]
    assert summarize(run)["wall_s"] == 5


def _compare(a: Path, b: Path, out: Path, *extra: str) -> int:
    return main(["--a", str(a), "--b", str(b), "--out", str(out), *extra])


def test_budget_check_matched_tokens_compute_and_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = make_run(tmp_path / "a", steps=20, name="a")
    same_tokens = make_run(tmp_path / "b", steps=20, flops_per_token=9e3, name="b")
    assert _compare(a, same_tokens, tmp_path / "r1") == 0
    assert "matched tokens: 2,000 in both runs" in (tmp_path / "r1" / "report.md").read_text()
    # matched compute: 30 steps at 2/3 the FLOPs per token = the same model FLOPs
    same_flops = make_run(tmp_path / "c", steps=30, flops_per_token=4e3, name="c")
    assert _compare(a, same_flops, tmp_path / "r2") == 0
    assert "matched compute: model FLOPs" in (tmp_path / "r2" / "report.md").read_text()
    capsys.readouterr()
    # 30 vs 20 steps at equal FLOPs per token: neither matched -> refused in one line, no report
    longer = make_run(tmp_path / "d", steps=30, name="d")
    assert _compare(a, longer, tmp_path / "r3") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unmatched budgets: 2,000 vs 3,000 tokens") and err.count("\n") == 1, err
    assert "--allow-unmatched-budget" in err and not (tmp_path / "r3").exists()
    # labelled when asked
    assert _compare(a, longer, tmp_path / "r4", "--allow-unmatched-budget") == 0
    text = (tmp_path / "r4" / "report.md").read_text()
    assert "UNMATCHED BUDGETS" in text.splitlines()[0] and "not a matched comparison" in text
    # an unfinished run is named
    stopped = make_run(tmp_path / "e", steps=20, total_steps=30, name="e")
    assert _compare(a, stopped, tmp_path / "r5") == 0
    assert f"{tmp_path / 'e'} stopped at step 20 of 30" in (tmp_path / "r5" / "report.md").read_text()
    capsys.readouterr()
    # a run against itself, under two spellings of its path
    assert _compare(a, tmp_path / "b" / ".." / "a", tmp_path / "r6") == 2
    assert "compared with itself" in capsys.readouterr().err


def test_out_that_is_a_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = make_run(tmp_path / "a", steps=3, name="a"), make_run(tmp_path / "b", steps=3, name="b")
    (tmp_path / "taken").write_text("x")
    assert _compare(a, b, tmp_path / "taken") == 2
    assert capsys.readouterr().err.startswith(f"error: --out {tmp_path / 'taken'} is a file, not a directory")
    assert _compare(a, b, tmp_path / "taken" / "sub") == 2
    assert f"lies under the file {tmp_path / 'taken'}" in capsys.readouterr().err


def _consumed(path: Path, rows: list[dict[str, Any]]) -> None:
    (path / "consumed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_skipped_updates_and_rollback_batches_are_not_identical_data(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 22: a dropped update (spike or non-finite) or a rollback's skipped batches mean the arms no
    longer learned from identical data: refused (named), labelled with --allow-different-data."""
    a, b = make_run(tmp_path / "a", steps=4, name="a"), make_run(tmp_path / "b", steps=4, name="b")
    same = [{"step": s, "samples": 8 * s, "sha": f"h{s}"} for s in (2, 4)]
    _consumed(a, same)
    _consumed(b, [*same[:1], {**same[1], "skipped_updates": 1}])
    assert _compare(a, b, tmp_path / "r1") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: identical samples through step 4, but not learned alike: skipped updates") and \
        f"{b}: 1" in err and err.count("\n") == 1, err
    assert _compare(a, b, tmp_path / "r2", "--allow-different-data") == 0
    assert "DIFFERENT DATA" in (tmp_path / "r2" / "report.md").read_text()
    # a rollback that skipped batches: the records diverge, and the refusal says why
    _consumed(b, [same[0], {"step": 4, "samples": 32, "sha": "other", "skipped_batches": 2}])
    (b / "rollbacks.json").write_text(json.dumps([{"detected_at": 4, "flagged_steps": [3, 4], "checkpoint":
                                                   "step0000002", "to_step": 2, "skip_from_step": 3, "skip_batches": 2,
                                                   "lr_factor": 1.0}]))
    assert _compare(a, b, tmp_path / "r3") == 2
    err = capsys.readouterr().err
    assert "consumed.jsonl records differ from step 4" in err and f"{b} skipped 2 global batch(es) at step 3 after " \
        "rolling back to step0000002 (loss spikes at steps [3, 4]; rollbacks.json)" in err, err
