"""Compare two training runs: a Markdown report with a table and plots.

    mythos-compare --a RUN_A --b RUN_B --out report/ [--allow-different-data] [--allow-unmatched-budget] \\
        [--multihop RDT_TASK_RUN DENSE_TASK_RUN]

(``mythos-compare RUN_A RUN_B ...``, the older positional form, still works.)

``mythos-compare`` is the installed command; ``python -m mythos.tools.compare`` and, in a checkout,
``python launch/compare.py`` run the same :func:`main`.

Reads each run's ``run_info.json``, its metrics (``metrics.jsonl``; the TensorBoard event files via
``EventAccumulator`` when there is no jsonl) and, when present, ``eval/results.json`` from
``python -m mythos.eval``. Writes ``report.md`` and PNG plots (matplotlib, Agg):

- ``loss_vs_tokens.png``, ``loss_vs_flops.png``, ``loss_vs_wallclock.png``: train (lines) and val
  (markers) loss of both runs;
- ``loss_vs_loops.png``: val loss of the RDT per loop count (the dense run as a horizontal line);
- ``multihop_accuracy.png``: exact-match accuracy vs hop count per model and loop count, from the
  runs' eval results or from the ``--multihop`` pair (runs trained on a :mod:`mythos.tasks` task).

**Identical data is checked, not assumed.** Both runs' ``data_fingerprint`` (sha256 over the
manifest's data hash and the first training samples in global order) and ``data_hash`` must be
equal, and so must their records of what they *consumed* (``consumed.jsonl``: a running hash of
the sample ids every step trained on) at every step both logged; otherwise the comparison is
refused (exit 2, one line) unless ``--allow-different-data``, which writes the report labelled
"DIFFERENT DATA". The same check applies to the ``--multihop`` pair.

**Equal budgets are checked too** (:func:`budget_check`): the two runs must have trained on the
same number of tokens (a matched-tokens comparison) or the same model FLOPs within
:data:`mythos.tools.plan.COMPUTE_TOLERANCE` (matched compute), and a run is never compared with itself.
Otherwise the comparison is refused (exit 2, one line) unless ``--allow-unmatched-budget``, which
labels the report "UNMATCHED BUDGETS". Refusing rather than comparing at the common step: the two
learning-rate schedules decay to different ends, so a shorter run's loss at step k is not what the
longer run's would be at k with the same budget.

Wall time spans every segment of a resumed run (``run_info.json`` ``segments``;
:mod:`mythos.train.provenance`) and excludes the time between them (a requeued job waiting in the
queue); device-hours sum each segment's duration times its world size.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mythos.cli_common import ArgumentParser, fail, prepare_out_dir
from mythos.config import ConfigError
from mythos.io import atomic_write, atomic_write_text
from mythos.tools.runs import (
    CompareError,
    Run,
    budget_check,
    data_check,
    elapsed,
    fmt_cell,
    load_run,
    segments,
)

COLORS = ("tab:blue", "tab:orange")


# ---------------------------------------------------------------------------------------------
# table


def _median(rows: list[dict[str, float]], key: str) -> float | None:
    vals = [r[key] for r in rows if key in r and math.isfinite(r[key])]
    return statistics.median(vals) if vals else None


def summarize(run: Run) -> dict[str, Any]:
    """The table's numbers for one run (None where unavailable)."""
    last = run.train[-1]
    segs = segments(run)
    wall = sum(s.seconds for s in segs)
    dev_s = [s.seconds * s.world_size for s in segs if s.world_size]
    ev = run.eval or {}
    lm = ev.get("lm") or {}
    s: dict[str, Any] = {
        "name": run.name, "kind": run.kind, "params": run.info.get("params"),
        "tokens": last.get("train/tokens"), "flops": last.get("train/flops"),
        "flops_per_token": run.info.get("flops_per_token"),
        "train_loss": last["train/loss"],
        "val_loss": run.val[-1]["val/loss"] if run.val else None,
        "val_bpb": run.val[-1].get("val/bpb") if run.val else None,
        "eval_loss": lm.get("loss"), "eval_bpb": lm.get("bpb"), "eval_ppl": lm.get("ppl"),
        "eval_checkpoint": ev.get("checkpoint"),
        "wall_s": wall if math.isfinite(wall) else None,
        "segments": len(segs),
        "device_hours": sum(dev_s) / 3600 if len(dev_s) == len(segs) else None,
        "tokens_per_wall_s": last.get("train/tokens") / wall if wall > 0 and last.get("train/tokens") else None,
        "tokens_per_s": _median(run.train, "perf/tokens_per_s"),
        "mfu": _median(run.train, "perf/mfu"),
        "world_size": run.info.get("world_size"),
    }
    by_loops = lm.get("by_loops") or {}
    if by_loops:
        best = min(by_loops, key=lambda t: by_loops[t]["loss"])
        s["best_loops"], s["best_loops_loss"] = int(best), by_loops[best]["loss"]
    return s


def table(sa: dict[str, Any], sb: dict[str, Any]) -> str:
    rows = [
        ("model", lambda s: f"{s['name']} ({s['kind']})"),
        ("parameters", lambda s: fmt_cell(s["params"] / 1e6 if s["params"] else None, ".2f") + "M"),
        ("tokens trained", lambda s: fmt_cell(s["tokens"], ",.0f")),
        ("training FLOPs (model)", lambda s: fmt_cell(s["flops"], ".3e")),
        ("FLOPs per token (model)", lambda s: fmt_cell(s["flops_per_token"], ".3e")),
        ("final train loss", lambda s: fmt_cell(s["train_loss"])),
        ("final val loss (training eval)", lambda s: fmt_cell(s["val_loss"])),
        ("final val bpb (training eval)", lambda s: fmt_cell(s["val_bpb"])),
        ("eval val loss (mythos.eval)", lambda s: fmt_cell(s["eval_loss"])),
        ("eval val bpb (mythos.eval)", lambda s: fmt_cell(s["eval_bpb"])),
        ("eval perplexity", lambda s: fmt_cell(s["eval_ppl"], ".2f")),
        ("best RDT loop count (eval loss)", lambda s: f"T={s['best_loops']}: {s['best_loops_loss']:.4f}"
            if "best_loops" in s else "-"),
        ("wall time (all segments)", lambda s: fmt_cell(s["wall_s"], ".0f") + f" s ({s['segments']} segment"
            + ("s)" if s["segments"] != 1 else ")")),
        ("device-hours (world size x wall)", lambda s: fmt_cell(s["device_hours"], ".3g")),
        ("tokens/s over the wall time", lambda s: fmt_cell(s["tokens_per_wall_s"], ",.0f")),
        ("median tokens/s (per step)", lambda s: fmt_cell(s["tokens_per_s"], ",.0f")),
        ("median MFU", lambda s: fmt_cell(100 * s["mfu"], ".1f") + " %" if s["mfu"] is not None
            else "n/a (no peak FLOP/s: CPU)"),
        ("world size", lambda s: str(s["world_size"])),
    ]
    out = [f"| | {sa['name']} | {sb['name']} |", "|---|---:|---:|"]
    out += [f"| {label} | {fn(sa)} | {fn(sb)} |" for label, fn in rows]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# plots


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Any, path: Path) -> None:
    """The figure as ``path``, atomically (the temp name has no ``.png``: the format is explicit)."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))


def plot_loss(runs: Sequence[Run], x_key: str, xlabel: str, path: Path, title: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for run, color in zip(runs, COLORS):
        segs = segments(run)
        xs = [elapsed(segs, r["time"]) if x_key == "time" else r.get(x_key, math.nan) for r in run.train]
        ax.plot(xs, [r["train/loss"] for r in run.train], color=color, alpha=0.8, lw=1.2, label=f"{run.name} train")
        if run.val:
            vx = [elapsed(segs, r["time"]) if x_key == "time" else r.get(x_key, math.nan) for r in run.val]
            ax.plot(vx, [r["val/loss"] for r in run.val], "o--", color=color, ms=5, label=f"{run.name} val")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    if x_key == "train/flops":
        ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_png(fig, path)
    plt.close(fig)


def _loop_curve(run: Run) -> dict[int, float]:
    """RDT val loss per loop count: eval results, else the last training eval's ``val/loss@T``."""
    by = ((run.eval or {}).get("lm") or {}).get("by_loops")
    if by:
        return {int(t): v["loss"] for t, v in by.items()}
    if run.val:
        return {int(k.split("@")[1]): v for k, v in run.val[-1].items() if k.startswith("val/loss@")}
    return {}


def plot_loops(runs: Sequence[Run], path: Path) -> bool:
    curves = [(r, _loop_curve(r)) for r in runs if r.kind == "rdt"]
    curves = [(r, c) for r, c in curves if c]
    if not curves:
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for (run, curve), color in zip(curves, COLORS):
        ts = sorted(curve)
        ax.plot(ts, [curve[t] for t in ts], "o-", color=color, label=f"{run.name} (RDT)")
    for run in runs:
        if run.kind == "dense":
            s = summarize(run)
            y = s["eval_loss"] if s["eval_loss"] is not None else s["val_loss"]
            if y is not None:
                ax.axhline(y, color="gray", ls="--", label=f"{run.name} (dense)")
    ax.set_xscale("log", base=2)
    ticks = sorted({t for _, c in curves for t in c})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_xlabel("loop count T at evaluation")
    ax.set_ylabel("val loss (nats/token)")
    ax.set_title("RDT validation loss vs test-time loops")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_png(fig, path)
    plt.close(fig)
    return True


def plot_multihop(runs: Sequence[Run], path: Path) -> bool:
    """Accuracy vs hops per (run, loop count); the training hop range is shaded."""
    data = [(r, r.eval["multihop"]) for r in runs if r.eval and r.eval.get("multihop")]
    if not data:
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.2, 4.6))
    cmap = plt.get_cmap("viridis")
    train_hops = data[0][1].get("train_hops") or []
    if train_hops:
        ax.axvspan(min(train_hops) - 0.5, max(train_hops) + 0.5, color="0.92", label="trained hop counts")
    for run, mh in data:
        acc = mh["accuracy"]
        keys = list(acc)
        for i, key in enumerate(keys):
            hops = sorted(acc[key], key=int)
            ys = [acc[key][h] for h in hops]
            if run.kind == "rdt":
                color = cmap(i / max(len(keys) - 1, 1))
                ax.plot([int(h) for h in hops], ys, "o-", color=color, ms=3, lw=1.2, label=f"{run.name} T={key}")
            else:
                ax.plot([int(h) for h in hops], ys, "s--", color="crimson", lw=2, label=f"{run.name}")
    chance = data[0][1].get("chance")
    if chance:
        ax.axhline(chance, color="k", ls=":", lw=1, label=f"chance ({chance:.2f})")
    ax.set_xlabel("hops")
    ax.set_ylabel("exact-match accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{data[0][1].get('task', 'multi-hop')}: accuracy vs hops (per test-time loop count)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="upper right")
    save_png(fig, path)
    plt.close(fig)
    return True


def multihop_table(runs: Sequence[Run]) -> str:
    data = [(r, r.eval["multihop"]) for r in runs if r.eval and r.eval.get("multihop")]
    if not data:
        return ""
    hops = list(data[0][1]["count"])
    out = [f"| model | T | {' | '.join(hops)} |", "|---|---|" + "---:|" * len(hops)]
    for run, mh in data:
        for key, acc in mh["accuracy"].items():
            out.append(f"| {run.name} | {key} | " + " | ".join(fmt_cell(acc.get(h), ".2f") for h in hops) + " |")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# report


def build_report(a: Run, b: Run, out: Path, *, identical: bool, data_line: str,
                 task_pair: tuple[Run, Run] | None = None, task_identical: bool = True, task_line: str = "",
                 budget: tuple[str | None, str] | None = None) -> Path:
    """Write ``out/report.md`` and its plots; ``budget`` is :func:`budget_check`'s result (computed
    here when not given)."""
    out.mkdir(parents=True, exist_ok=True)
    runs = (a, b)
    match, budget_line = budget or budget_check(a, b)
    label = "identical-data comparison" if identical else "DIFFERENT DATA (not an identical-data comparison)"
    label += f", matched {match}" if match else ", UNMATCHED BUDGETS"
    sa, sb = summarize(a), summarize(b)
    lines = [f"# {a.name} vs {b.name}: {label}", "", f"- Data: {data_line}", f"- Budget: {budget_line}",
             f"- Runs: `{a.path}` and `{b.path}`", ""]
    if not identical:
        lines += ["> **Warning:** the runs did not see the same data; differences below mix model and data "
                  "effects.", ""]
    if match is None:
        lines += ["> **Warning:** the runs trained on neither the same tokens nor the same compute; their final "
                  "numbers are not a matched comparison (read the curves at equal tokens or FLOPs).", ""]
    lines += ["## Summary", "", table(sa, sb), "",
              "FLOPs are model FLOPs (mythos.accounting; the RDT at its expected loop count). "
              "`eval` rows come from `python -m mythos.eval` (whole val split, bits per byte from exact "
              "per-token byte counts); `training eval` rows are the trainer's last periodic eval.", ""]
    plots = [("loss_vs_tokens.png", "train/tokens", "tokens", "Loss vs tokens"),
             ("loss_vs_flops.png", "train/flops", "training FLOPs (model)", "Loss vs training FLOPs"),
             ("loss_vs_wallclock.png", "time", "wall-clock seconds", "Loss vs wall-clock")]
    lines += ["## Loss curves", ""]
    for fname, key, xlabel, title in plots:
        plot_loss(runs, key, xlabel, out / fname, title)
        lines += [f"![{title}]({fname})", ""]
    if plot_loops(runs, out / "loss_vs_loops.png"):
        lines += ["## RDT: validation loss vs test-time loop count", "", "![loss vs loops](loss_vs_loops.png)", ""]
        for run in runs:
            curve = _loop_curve(run)
            if curve:
                lines.append(f"- {run.name}: " + ", ".join(f"T={t}: {curve[t]:.4f}" for t in sorted(curve)))
        lines.append("")
    mh_runs: Sequence[Run] = runs
    if task_pair is not None:
        mh_runs = task_pair
        lines += ["## Depth extrapolation (multi-hop task)", "",
                  f"- Runs: `{task_pair[0].path}` and `{task_pair[1].path}`",
                  f"- Data: {task_line}" + ("" if task_identical else " -- DIFFERENT DATA"), ""]
        ts = [summarize(r) for r in task_pair]
        lines += [table(ts[0], ts[1]), ""]
    if plot_multihop(mh_runs, out / "multihop_accuracy.png"):
        if task_pair is None:
            lines += ["## Multi-hop accuracy", ""]
        lines += ["![multi-hop accuracy](multihop_accuracy.png)", "", "Exact-match accuracy per hop count "
                  "(columns) and test-time loop count T (rows; `default` = the model's only depth):", "",
                  multihop_table(mh_runs), ""]
    report = out / "report.md"
    atomic_write_text(report, "\n".join(lines))
    return report


def build_parser() -> ArgumentParser:
    """The ``mythos-compare`` argument parser."""
    ap = ArgumentParser(prog="mythos-compare", description=__doc__)
    req = ap.add_argument_group("required (or the older positional form RUN_A RUN_B)")
    req.add_argument("--a", default=None, metavar="RUN_DIR", help="run directory of arm A, e.g. the RDT (required)")
    req.add_argument("--b", default=None, metavar="RUN_DIR",
                     help="run directory of arm B, e.g. the dense baseline (required)")
    ap.add_argument("run_a", nargs="?", default=None, help=argparse.SUPPRESS)  # the older positional spelling
    ap.add_argument("run_b", nargs="?", default=None, help=argparse.SUPPRESS)
    req.add_argument("--out", required=True, metavar="DIR", help="report directory (report.md + PNGs)")
    ap.add_argument("--allow-different-data", action="store_true",
                    help="write the report even if the data fingerprints differ (labelled as such)")
    ap.add_argument("--allow-unmatched-budget", action="store_true",
                    help="write the report even if the runs trained on neither the same tokens nor the same "
                         "model FLOPs (labelled UNMATCHED BUDGETS)")
    ap.add_argument("--multihop", nargs=2, metavar=("RUN_C", "RUN_D"),
                    help="a pair of runs trained on a mythos.tasks task: adds the depth-extrapolation section "
                         "(default: none, no such section)")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    ap = build_parser()
    a = ap.parse_intermixed_args(argv)  # RUN_A --out DIR RUN_B (the positional form) still parses
    positional = [r for r in (a.run_a, a.run_b) if r is not None]
    flagged = [r for r in (a.a, a.b) if r is not None]
    if positional and flagged:
        ap.error("give the two runs as --a RUN_A --b RUN_B (or both positionally), not mixed")
    a.run_a, a.run_b = (a.a, a.b) if flagged else (a.run_a, a.run_b)
    if a.run_a is None or a.run_b is None:
        ap.error("the two runs are required: --a RUN_A --b RUN_B")
    try:
        ra, rb = load_run(a.run_a), load_run(a.run_b)
        budget = budget_check(ra, rb)
        if budget[0] is None and not a.allow_unmatched_budget:
            raise CompareError(f"{budget[1]}; refusing (pass --allow-unmatched-budget to write a report labelled "
                               "as such)")
        identical, line = data_check(ra, rb)
        if not identical and not a.allow_different_data:
            raise CompareError(f"{line}; refusing an identical-data comparison (pass --allow-different-data to "
                               f"write a report labelled as such)")
        pair, t_ident, t_line = None, True, ""
        if a.multihop:
            pair = (load_run(a.multihop[0]), load_run(a.multihop[1]))
            t_ident, t_line = data_check(*pair)
            if not t_ident and not a.allow_different_data:
                raise CompareError(f"--multihop runs: {t_line}; refusing (pass --allow-different-data)")
        out = prepare_out_dir(a.out)
        report = build_report(ra, rb, out, identical=identical, data_line=line, task_pair=pair,
                              task_identical=t_ident, task_line=t_line, budget=budget)
    except (CompareError, ConfigError) as exc:
        return fail(exc)
    print(f"wrote {report} ({'identical data' if identical else 'DIFFERENT DATA'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
