"""A training run as the tools read it, and whether two runs may be compared.

- :func:`load_run`: ``run_info.json``, the metrics (``metrics.jsonl``, or the TensorBoard events
  when there is no jsonl) and ``eval/results.json`` of one run directory, as a :class:`Run`.
- :func:`data_check`: identical data, checked rather than assumed -- equal data fingerprints and
  hashes, equal consumed-data records at every step both logged, and no skipped update or
  rollback-skipped batch in either (:mod:`mythos.train.audit`, :mod:`mythos.train.spikes`).
- :func:`budget_check`: matched tokens, or matched model FLOPs within
  :data:`mythos.tools.plan.COMPUTE_TOLERANCE`; a run is never compared with itself.
- :func:`segments` / :func:`elapsed`: how long a run really trained, over every resumed segment
  (``run_info.json`` ``segments``), without the time between them (a requeued job in the queue).

Used by ``mythos-compare`` (:mod:`mythos.tools.compare`) and the experiment report.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mythos.run_dir import EVAL_RESULTS, METRICS, ROLLBACKS, RUN_INFO, TENSORBOARD
from mythos.tools.plan import COMPUTE_TOLERANCE
from mythos.train.audit import read_consumed_rows
from mythos.train.spikes import read_rollbacks


def fmt_cell(x: Any, spec: str = ".4f") -> str:
    """``format(x, spec)``, or ``n/a`` for a missing or non-finite number (every report table)."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return format(x, spec)


class CompareError(Exception):
    """Bad input; the message is one line naming the run/file."""


@dataclass
class Run:
    """Everything the report needs from one run directory."""

    path: Path
    info: dict[str, Any]
    train: list[dict[str, float]] = field(default_factory=list)
    """Rows with ``train/loss`` (step, time, train/tokens, train/flops, perf/*)."""
    val: list[dict[str, float]] = field(default_factory=list)
    """Rows with ``val/loss`` (+ ``val/loss@T``, ``val/bpb``); tokens/flops/time joined from train."""
    eval: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return str(self.info.get("name") or self.path.name)

    @property
    def kind(self) -> str:
        return str(self.info.get("kind", "?"))


# ---------------------------------------------------------------------------------------------
# reading


def _read_jsonl(path: Path) -> list[dict[str, float]]:
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise CompareError(f"{path} line {i}: not valid JSON") from None
    return rows


def _read_tensorboard(tb_dir: Path) -> list[dict[str, float]]:
    """metrics.jsonl-shaped rows from TensorBoard scalars (``time`` = event wall time)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    by_step: dict[int, dict[str, float]] = {}
    for tag in acc.Tags().get("scalars", []):
        for ev in acc.Scalars(tag):
            row = by_step.setdefault(ev.step, {"step": ev.step, "time": ev.wall_time})
            row[tag] = ev.value
            row["time"] = max(row["time"], ev.wall_time)
    return [by_step[s] for s in sorted(by_step)]


def load_run(path: str | Path) -> Run:
    p = Path(path)
    info_path = p / RUN_INFO
    if not info_path.is_file():
        raise CompareError(f"{info_path} not found: {p} is not a training run directory")
    info = json.loads(info_path.read_text())
    if (p / METRICS).is_file():
        rows = _read_jsonl(p / METRICS)
    elif (p / TENSORBOARD).is_dir():
        rows = _read_tensorboard(p / TENSORBOARD)
    else:
        raise CompareError(f"{p} has neither metrics.jsonl nor tensorboard/ (did the run log anything?)")
    train = [r for r in rows if "train/loss" in r]
    if not train:
        raise CompareError(f"{p}: no train/loss in the metrics")
    val = []
    for r in rows:
        if "val/loss" not in r:
            continue
        prev = [t for t in train if t["step"] <= r["step"]]  # attach the x-axes of the step it was taken at
        last = prev[-1] if prev else train[0]
        val.append({**r, "train/tokens": last.get("train/tokens", math.nan), "train/flops": last.get("train/flops",
                    math.nan), "time": r.get("time", last.get("time", math.nan))})
    res_path = p / EVAL_RESULTS
    ev = json.loads(res_path.read_text()) if res_path.is_file() else None
    return Run(p, info, train, val, ev)


def data_check(a: Run, b: Run) -> tuple[bool, str]:
    """``(identical, one-line description)``: the up-front data fingerprints and hashes must be
    equal, and the runs' records of what they *consumed* (``consumed.jsonl``, a running hash of
    the sample ids each step trained on; :mod:`mythos.train.audit`) must agree at every step both
    recorded."""
    fa, fb = a.info.get("data_fingerprint"), b.info.get("data_fingerprint")
    ha, hb = a.info.get("data_hash"), b.info.get("data_hash")
    if not (fa and fa == fb and ha == hb):
        return False, (f"data fingerprints differ ({a.path}: {str(fa)[:16]}, {b.path}: {str(fb)[:16]}; "
                       f"data hashes {str(ha)[:12]} vs {str(hb)[:12]})")
    line = f"identical data: fingerprint {fa[:16]} (data hash {str(ha)[:16]}) in both runs"
    rows_a, rows_b = read_consumed_rows(a.path), read_consumed_rows(b.path)
    ca, cb = {r["step"]: r["sha"] for r in rows_a}, {r["step"]: r["sha"] for r in rows_b}
    if not ca or not cb:
        missing = a.path if not ca else b.path
        return True, f"{line}; no consumed-data record in {missing} (older run): only the fingerprint was checked"
    common = sorted(set(ca) & set(cb))
    bad = [s for s in common if ca[s] != cb[s]]
    if bad:
        why = "".join(_rollback_note(r) for r in (a, b))
        return False, (f"the runs consumed different samples: consumed.jsonl records differ from step {bad[0]} "
                       f"({a.path}: {ca[bad[0]][:12]}, {b.path}: {cb[bad[0]][:12]}){why}")
    if not common:
        return True, f"{line}; consumed-data records share no logged step (different log_interval?)"
    # the same samples went in, but a dropped update (non-finite loss, spike) means it was not learned
    at = common[-1]
    skipped = [(r.path, row.get("skipped_updates", 0)) for r, rows in ((a, rows_a), (b, rows_b))
               for row in rows if row["step"] == at]
    if any(n for _, n in skipped):
        return False, (f"identical samples through step {at}, but not learned alike: skipped updates (non-finite "
                       f"or spike) {', '.join(f'{p}: {n}' for p, n in skipped)} (consumed.jsonl)")
    return True, f"{line}; consumed the same samples through step {common[-1]} (consumed.jsonl)"


def _rollback_note(run: Run) -> str:
    """``; RUN skipped N global batches at step S after a rollback ...`` for each recorded rollback."""
    return "".join(f"; {run.path} skipped {e['skip_batches']} global batch(es) at step {e['skip_from_step']} after "
                   f"rolling back to {e['checkpoint']} (loss spikes at steps {e['flagged_steps']}; {ROLLBACKS})"
                   for e in read_rollbacks(run.path) if e.get("skip_batches"))


def budget_check(a: Run, b: Run) -> tuple[str | None, str]:
    """``(match, one-line description)``: ``match`` is ``"tokens"`` when both runs trained on the
    same number of tokens, ``"compute"`` when their model FLOPs agree within
    :data:`COMPUTE_TOLERANCE`, None otherwise (then the runs' final numbers are not comparable).
    Raises :class:`CompareError` for a run compared with itself. A run that stopped before its
    ``total_steps`` is named in the line."""
    if a.path.resolve() == b.path.resolve():
        raise CompareError(f"{a.path} is given as both runs (a run compared with itself has no gap to report)")
    ta, tb = (r.train[-1].get("train/tokens") for r in (a, b))
    fa, fb = (r.train[-1].get("train/flops") for r in (a, b))
    unfinished = [f"{r.path} stopped at step {r.train[-1]['step']} of {r.info['total_steps']}"
                  for r in (a, b) if r.info.get("total_steps") and r.train[-1]["step"] < r.info["total_steps"]]
    tail = f" ({'; '.join(unfinished)})" if unfinished else ""
    if ta is not None and ta == tb:
        return "tokens", f"matched tokens: {int(ta):,} in both runs{tail}"
    if fa and fb and abs(fa / fb - 1) <= COMPUTE_TOLERANCE:
        return "compute", f"matched compute: model FLOPs {fa:.3e} vs {fb:.3e} ({100 * (fa / fb - 1):+.2f}%){tail}"
    return None, (f"unmatched budgets: {fmt_cell(ta, ',.0f')} vs {fmt_cell(tb, ',.0f')} tokens and model FLOPs "
                  f"{fmt_cell(fa, '.3e')} vs {fmt_cell(fb, '.3e')} (neither matched tokens nor compute within "
                  f"{100 * COMPUTE_TOLERANCE:g}%){tail}")


# ---------------------------------------------------------------------------------------------
# time: a resumed run's segments


@dataclass(frozen=True)
class Segment:
    start: float
    end: float
    world_size: int | None

    @property
    def seconds(self) -> float:
        return max(self.end - self.start, 0.0)


def segments(run: Run) -> list[Segment]:
    """The run's training segments in order. ``run_info.json`` lists them (one per start or
    resume); a segment without a recorded end (killed without warning) ends at its last metrics
    row. A record from before segments existed is one segment from ``start_time``."""
    rows = [*run.train, *run.val]
    recs = run.info.get("segments") or [{"start_time": run.info.get("start_time", run.train[0].get("time", 0.0)),
                                         "world_size": run.info.get("world_size")}]
    out = []
    for i, rec in enumerate(recs):
        start = float(rec["start_time"])
        end = rec.get("end_time")
        if end is None:
            nxt = float(recs[i + 1]["start_time"]) if i + 1 < len(recs) else math.inf
            end = max((r["time"] for r in rows if start <= r.get("time", -math.inf) < nxt), default=start)
        out.append(Segment(start, float(end), rec.get("world_size")))
    return out


def elapsed(segs: Sequence[Segment], t: float) -> float:
    """Training seconds up to wall-clock time ``t``: whole earlier segments plus the part of the
    one ``t`` falls in (the gaps between segments are not training time)."""
    before = [s for s in segs if s.start <= t]
    if not before:
        return 0.0
    *done, cur = before
    return sum(s.seconds for s in done) + (t - cur.start)
