"""Plots of the experiment report (:mod:`mythos.tools.experiment_report`): seed means with min-max bands.

Inputs are the report's run lists and summaries; each function writes one PNG (matplotlib, Agg).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mythos.tools.compare import pyplot, save_png
from mythos.tools.runs import Run

COLORS = {"a": "tab:blue", "b": "tab:orange"}
SMOOTH_POINTS = 25
"""Train loss is a trailing running mean over ``ceil(n / SMOOTH_POINTS)`` logged points."""


def _finish(fig: Any, axes: Sequence[Any], path: Path, xlabel: str, ylabel: str, **legend: Any) -> None:
    """Label, grid and legend (``legend``: its keywords) ``axes``; save ``fig`` to ``path`` and close it."""
    for ax in axes:
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend(**{"fontsize": 8, **legend})
    axes[0].set_ylabel(ylabel)
    save_png(fig, path)
    pyplot().close(fig)


def _band(runs: Sequence[Run], rows: str, x_key: str, y_key: str) -> tuple[list[float], ...]:
    """``(x, mean, min, max)`` over seeds at the steps every run logged (train rows smoothed)."""
    per_run = []
    for r in runs:
        got = [(row["step"], row.get(x_key, math.nan), row[y_key]) for row in getattr(r, rows) if y_key in row]
        ys, w = [y for _, _, y in got], max(1, math.ceil(len(got) / SMOOTH_POINTS)) if rows == "train" else 1
        ys = [statistics.fmean(ys[max(0, i - w + 1):i + 1]) for i in range(len(ys))]  # trailing running mean
        per_run.append({s: (x, y) for (s, x, _), y in zip(got, ys)})
    steps = sorted(set.intersection(*(set(p) for p in per_run)))
    xs = [statistics.fmean(p[s][0] for p in per_run) for s in steps]
    ys = [[p[s][1] for p in per_run] for s in steps]
    return xs, [statistics.fmean(v) for v in ys], [min(v) for v in ys], [max(v) for v in ys]


def plot_loss(arms: dict[str, Sequence[Run]], x_key: str, xlabel: str, path: Path) -> None:
    """Train loss (smoothed, seed mean, min-max band) and val loss (seed mean, min-max bars) vs ``x_key``."""
    fig, ax = pyplot().subplots(figsize=(6.8, 4.4))
    for key, runs in arms.items():
        c, name = COLORS[key], runs[0].name
        xs, mean, lo, hi = _band(runs, "train", x_key, "train/loss")
        ax.plot(xs, mean, color=c, lw=1.4, label=f"{name} train (mean of {len(runs)} seed(s))")
        ax.fill_between(xs, lo, hi, color=c, alpha=0.2, lw=0)
        vx, vm, vlo, vhi = _band(runs, "val", x_key, "val/loss")
        if vx:
            err = [[m - lo_ for m, lo_ in zip(vm, vlo)], [hi_ - m for m, hi_ in zip(vm, vhi)]]
            ax.errorbar(vx, vm, yerr=err, fmt="o--", color=c, ms=5, capsize=3, label=f"{name} val")
    ax.set_title(f"Loss vs {xlabel} (band / bars: min-max over seeds)")
    if x_key == "train/flops":
        ax.set_xscale("log")
    _finish(fig, [ax], path, xlabel, "loss (nats/token)")


def plot_loops(comps: Sequence[dict[str, Any]], path: Path) -> bool:
    """Per RDT model (one colour each): val loss per test-time loop count (seed mean, min-max band),
    and the final val loss of its matched-compute dense arm as a dashed line. False when no RDT
    arm has loss-by-loops."""
    first: dict[str, dict[str, Any]] = {}
    for c in comps:
        if c["a"]["loss_by_loops"] and (c["a"]["name"] not in first or c["match"] == "compute"):
            first[c["a"]["name"]] = c
    if not first:
        return False
    fig, ax = pyplot().subplots(figsize=(6.8, 4.4))
    for i, c in enumerate(first.values()):
        by, color = c["a"]["loss_by_loops"], f"C{i}"
        ts = sorted(by, key=int)
        x = [int(t) for t in ts]
        ax.plot(x, [by[t]["mean"] for t in ts], "o-", color=color, label=f"{c['a']['name']} (seed mean)")
        ax.fill_between(x, [by[t]["min"] for t in ts], [by[t]["max"] for t in ts], color=color, alpha=0.2, lw=0)
        fb = c["b"]["final_val_loss"]
        ax.axhline(fb["mean"], color=color, ls="--", lw=1, label=f"{c['b']['name']} ({c['match'] or 'no plan'})")
        ax.set_xticks(x, ts)
    ax.set_xscale("log", base=2)
    ax.set_title("Val loss vs test-time loops (band: min-max over seeds)")
    src = next(iter(first.values()))["val_loss_source"]
    _finish(fig, [ax], path, "loop count T at evaluation", f"val loss (nats/token, {src})", fontsize=7)
    return True


def plot_scaling(comps: Sequence[dict[str, Any]], path: Path) -> None:
    """Final val loss vs training compute (model FLOPs, log x): every run as a dot, the seed mean
    of each arm of each comparison as a marker with min-max bars; the RDT arms joined across
    sizes, the dense arms joined per matching."""
    fig, ax = pyplot().subplots(figsize=(6.8, 4.4))
    series: dict[tuple[str, str], list[tuple[float, dict[str, Any]]]] = {}
    for c in comps:
        for key in ("a", "b"):
            s = c[key]
            if not all(s["model_flops_trained"]):
                continue
            label = "RDT" if key == "a" else f"dense (matched {c['match']})"
            pts = series.setdefault((key, label), [])
            x = statistics.fmean(s["model_flops_trained"])
            if all(abs(x - px) > 1e-9 * x for px, _ in pts):  # an RDT arm shared by two comparisons
                pts.append((x, s["final_val_loss"]))
                ax.plot([x] * len(s["final_val_loss"]["per_seed"]), s["final_val_loss"]["per_seed"], ".",
                        color=COLORS[key], alpha=0.5)
    for (key, label), pts in series.items():
        pts.sort(key=lambda p: p[0])
        xs, st = [p[0] for p in pts], [p[1] for p in pts]
        err = [[v["mean"] - v["min"] for v in st], [v["max"] - v["mean"] for v in st]]
        ax.errorbar(xs, [v["mean"] for v in st], yerr=err, fmt="o-" if "tokens" not in label else "s:",
                    color=COLORS[key], capsize=3, label=label)
    ax.set_xscale("log")
    ax.set_title("Final val loss vs training compute (bars: min-max over seeds)")
    _finish(fig, [ax], path, "training FLOPs (model)", "final val loss (nats/token)")


def plot_multihop(mh: dict[str, Any], path: Path) -> None:
    """Three panels over hops, trained hops shaded, chance dotted, shortcut floor stepped. Top: the
    RDT's fixed-T sweep (seed means, colormap over T), its adaptive exits (thick, min-max band),
    the oracle T = hops + 1 (dashed: an upper bound, told the depth) and every dense baseline
    (seed mean, band). Middle: per seed, each arm's primary row. Bottom: the mean T each adaptive
    exit chose (seed mean, band) against T = hops + 1. Of a long fixed-T sweep only the powers of
    two, the best fixed T and the largest T are drawn (report.md has them all)."""
    fig, (ax, ax2, ax3) = pyplot().subplots(3, 1, figsize=(8.5, 15))  # legends outside, right of each panel
    cmap, th, hx = pyplot().get_cmap("viridis"), mh["train_hops"], [int(h) for h in mh["hops"]]
    for a in (ax, ax2):
        a.axvspan(0.5, th + 0.5, color="0.9", label=f"trained hops 1..{th}")
        a.set_ylim(-0.02, 1.02)
        if mh["chance"]:
            a.axhline(mh["chance"], color="k", ls=":", lw=1, label=f"chance ({mh['chance']:.3f})")
        if mh.get("floor"):
            a.step(hx, [mh["floor"][h] for h in mh["hops"]], where="mid", color="0.5", ls=":", lw=1.5,
                   label="shortcut floor (best fixed trained depth)")
    keys = mh.get("arms", ["a", "b"])
    a_arm = mh["a"]
    fixed = sorted((k for k in a_arm["curves"] if k.isdigit()), key=int)
    top = math.log2(max(int(k) for k in fixed)) if fixed else 1.0
    # a long sweep (1..32) would bury the plot: powers of two, the best fixed T and the largest
    shown = [k for k in fixed if int(k) & (int(k) - 1) == 0 or k in (a_arm.get("best_fixed_key"), fixed[-1])]
    for k in shown:
        ax.plot(hx, [a_arm["curves"][k][h] for h in mh["hops"]], "o-", ms=2.5, lw=0.8, alpha=0.8,
                color=cmap(math.log2(int(k)) / max(top, 1e-9)),
                label=f"{a_arm['name']} fixed T={k}" + (" (best)" if k == a_arm.get("best_fixed_key") else ""))
    rows = {r["key"]: r for r in a_arm["rows"]}
    for i, k in enumerate(a_arm.get("exit_keys", [])):
        c = rows[k]["curve"]
        color = ("crimson", "darkviolet", "teal")[i % 3]
        ax.plot(hx, [c[h]["mean"] for h in mh["hops"]], "o-", ms=5, lw=3, color=color, zorder=5,
                label=f"{a_arm['name']} {rows[k]['label']}")
        ax.fill_between(hx, [c[h]["min"] for h in mh["hops"]], [c[h]["max"] for h in mh["hops"]], color=color,
                        alpha=0.15, lw=0)
        ct = rows[k]["chosen_T"]
        ax3.plot(hx, [ct[h]["mean"] for h in mh["hops"]], "o-", lw=2, color=color, label=rows[k]["label"])
        ax3.fill_between(hx, [ct[h]["min"] for h in mh["hops"]], [ct[h]["max"] for h in mh["hops"]], color=color,
                         alpha=0.2, lw=0)
    for k in (k for k in a_arm["curves"] if k.startswith("hops")):
        ax.plot(hx, [a_arm["curves"][k][h] for h in mh["hops"]], "--", lw=1.5, color="crimson", alpha=0.6,
                label=f"{a_arm['name']} T={k}: ORACLE upper bound (told the depth)")
    markers = "sD^v<>"
    for j, key in enumerate(keys[1:]):
        arm = mh[key]
        c = next(r for r in arm["rows"] if r["key"] == arm["in_distribution"]["key"])["curve"]
        shade = str(0.55 * j / max(len(keys) - 2, 1))  # black, then greys
        size = f", {arm['params']:,} params" if arm.get("params") else ""
        ax.plot(hx, [c[h]["mean"] for h in mh["hops"]], f"{markers[j % 6]}--", color=shade, lw=1.8,
                label=f"{arm['name']} ({arm['kind']}{size})")
        ax.fill_between(hx, [c[h]["min"] for h in mh["hops"]], [c[h]["max"] for h in mh["hops"]], color=shade,
                        alpha=0.1, lw=0)
    for j, key in enumerate(keys):
        arm = mh[key]
        prim = next(r for r in arm["rows"] if r["key"] == arm["in_distribution"]["key"])
        ls = "-" if key == "a" else ("--", ":", "-.")[j % 3]
        for i, seed in enumerate(arm["seeds"]):
            acc = [prim["curve"][h]["per_seed"][i] for h in mh["hops"]]
            ax2.plot(hx, acc, ls, marker="o", ms=3, color=f"C{i}", label=f"{arm['name']} {prim['label']}, {seed}")
    ax3.plot(hx, [h + 1 for h in hx], ":", color="k", label="T = hops + 1 (what an oracle would run)")
    ax3.axvspan(0.5, th + 0.5, color="0.9")
    ax3.set_ylabel("mean loop count chosen")
    ax.set_title("exact match vs hops (seed means; bands: min-max over seeds)")
    ax2.set_title("per seed: each arm's primary row")
    ax3.set_title("adaptive exit: T the RDT chose by itself vs hops")
    _finish(fig, [ax, ax2, ax3], path, "hops", "exact-match accuracy", fontsize=6, loc="upper left",
            bbox_to_anchor=(1.01, 1.0))
