"""The multi-hop half of the experiment report: the chain task's arms (the RDT and any number of
dense baselines, one run per seed each), checked to share one test set, summarised per row
(adaptive exit, fixed T, the oracle T = hops + 1) and rendered as report.md lines.

Pure functions of runs (``mythos.tools.runs.Run`` with ``eval/results.json``'s ``multihop`` section,
``mythos-eval --multihop``), used by :mod:`mythos.tools.experiment_report`.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from mythos.tools.experiment_lm import ARMS, check_arms
from mythos.tools.experiment_lm import seed_of as _seed
from mythos.tools.experiment_lm import stats as _stats
from mythos.tools.runs import CompareError, Run, fmt_cell, load_run


def _mh(run: Run) -> dict[str, Any]:
    mh = (run.eval or {}).get("multihop")
    if not mh or not mh.get("accuracy") or not mh.get("count"):
        raise CompareError(f"{run.path}: no multihop section in eval/results.json (run python -m mythos.eval "
                           f"--run {run.path} --multihop TASK_DIR)")
    return mh


def check_test_sets(runs: Sequence[Run], train_hops: int) -> None:
    """All multi-hop runs were evaluated on the same test set (task data hash, queries per hop and,
    where recorded, the test file's sha256), trained on hops 1..``train_hops``."""
    ref = _mh(runs[0])
    for r in runs:
        mh = _mh(r)
        if (mh["count"] != ref["count"] or mh.get("data_hash") != ref.get("data_hash")
                or mh.get("test_sha256", ref.get("test_sha256")) != ref.get("test_sha256", mh.get("test_sha256"))):
            raise CompareError(f"multihop test sets differ (task hash or queries per hop): {runs[0].path} vs {r.path}")
        th = mh.get("train_hops")
        if th and sorted(int(h) for h in th) != list(range(1, train_hops + 1)):
            raise CompareError(f"{r.path} was trained on hops {th}, not 1..{train_hops} (--train-hops)")
    if not any(1 <= int(h) <= train_hops for h in ref["count"]):
        raise CompareError(f"{runs[0].path}: no test queries with 1..{train_hops} hops")


def _row(runs: Sequence[Run], key: str, label: str, hops: list[str], train_hops: int) -> dict[str, Any]:
    """One accuracy row over seeds: in-distribution mean (per seed, stats), unseen hops (seed mean
    and per seed), the whole curve (stats per hop); ``oracle`` for ``hops+c``; for an adaptive
    exit ``chosen_T`` (stats per hop of the mean T each seed's model chose)."""
    accs = [_mh(r)["accuracy"][key] for r in runs]
    ind = [statistics.fmean(acc[h] for h in hops if 1 <= int(h) <= train_hops) for acc in accs]
    unseen = [h for h in hops if int(h) > train_hops]
    row = {"key": key, "label": label, "oracle": key.startswith("hops"), "in_distribution": _stats(ind),
           "unseen": {h: statistics.fmean(acc[h] for acc in accs) for h in unseen},
           "unseen_per_seed": [{h: acc[h] for h in unseen} for acc in accs],
           "curve": {h: _stats([acc[h] for acc in accs]) for h in hops}}
    if key.startswith("exit"):
        chosen = [_mh(r)["exit_loops"][key] for r in runs]
        row["chosen_T"] = {h: _stats([c[h] for c in chosen]) for h in hops}
        row["max_loops"] = _mh(runs[0]).get("exit_max_loops")
        # core row-iterations per query over the whole test set (the count-weighted mean T chosen;
        # exited queries cost nothing more), against fixed T = max_loops for every query
        count = _mh(runs[0])["count"]
        n = sum(count[h] for h in hops)
        row["loops_per_query"] = _stats([sum(c[h] * count[h] for h in hops) / n for c in chosen])
    return row


def _label(key: str, max_loops: int | None) -> str:
    """The report's name for an accuracy key."""
    if key.startswith("hops"):
        return f"oracle upper bound: T = {key} per query (told the depth)"
    if key.startswith("exit-kl"):
        return f"adaptive exit: KL(p_t ‖ p_t-1) < {key[len('exit-kl'):]} (max T {max_loops})"
    if key.startswith("exit-act"):
        return f"adaptive exit: ACT halting (max T {max_loops})"
    return key


def multihop_summary(arms: dict[str, Sequence[Run]], train_hops: int) -> dict[str, Any]:
    """Per arm (``a`` the RDT, then the dense baselines ``b``, ``c``, ...; ``arms`` lists the keys):
    rows for the adaptive exits (``exit...``), the best fixed T (seed mean of the in-distribution
    accuracy), ``default`` (dense) and last the oracle ``hops+c`` rows (an upper bound, never the
    primary row); ``curves`` holds every key's seed-mean curve (the fixed-T sweep included).
    ``in_distribution`` / ``unseen`` repeat the primary row (the first adaptive exit, else the
    best fixed T, else default) for scripts."""
    hops = sorted(_mh(next(iter(arms.values()))[0])["count"], key=int)
    out: dict[str, Any] = {"train_hops": train_hops, "hops": hops, "arms": list(arms),
                           "unseen_hops": [h for h in hops if int(h) > train_hops]}
    for key, runs in arms.items():
        keys = [k for k in _mh(runs[0])["accuracy"] if all(k in _mh(r)["accuracy"] for r in runs)]
        max_loops = _mh(runs[0]).get("exit_max_loops")
        rows = [_row(runs, k, _label(k, max_loops), hops, train_hops) for k in keys if k.startswith("exit")]
        fixed = sorted((k for k in keys if k.isdigit()), key=int)
        best = None
        if fixed:  # max() keeps the smallest T among ties
            best = max((_row(runs, k, f"best fixed T = {k} (one T for every query)", hops, train_hops)
                        for k in fixed), key=lambda r: r["in_distribution"]["mean"])
            rows.append(best)
        rows += [_row(runs, k, k, hops, train_hops) for k in keys
                 if not k.isdigit() and not k.startswith(("hops", "exit"))]
        rows += [_row(runs, k, _label(k, max_loops), hops, train_hops) for k in keys if k.startswith("hops")]
        if not rows:
            raise CompareError(f"{runs[0].path}: no accuracy keys shared by all runs of its arm")
        curves = {k: _row(runs, k, k, hops, train_hops)["curve"] for k in keys}
        prim = next(r for r in rows + [rows[0]] if not r["oracle"])
        params = (runs[0].eval or {}).get("params")
        out[key] = {"name": runs[0].name, "kind": runs[0].kind, "params": params, "runs": [str(r.path) for r in runs],
                    "seeds": [_seed(r) or r.path.name for r in runs], "per_query_key": next((k for k in keys if
                    k.startswith("hops")), None), "best_fixed_key": best["key"] if best else None,
                    "exit_keys": [k for k in keys if k.startswith("exit")],
                    "in_distribution": {"key": prim["key"], **prim["in_distribution"]},
                    "unseen": prim["unseen"], "unseen_per_seed": prim["unseen_per_seed"], "rows": rows,
                    "curves": {k: {h: s["mean"] for h, s in c.items()} for k, c in curves.items()},
                    "fixed_T": {k: _row(runs, k, k, hops, train_hops) for k in fixed}}
    out["chance"] = _mh(arms["a"][0]).get("chance")
    floor = _mh(arms["a"][0]).get("floor")  # single-relation tasks: the best fixed trained depth
    out["floor"] = {h: floor[h] for h in hops if h in floor} if floor else None
    return out


def _arm_name(arm: dict[str, Any]) -> str:
    return f"{arm['name']} ({arm['params']:,} params)" if arm.get("params") else arm["name"]


def _mh_table(mh: dict[str, Any]) -> list[str]:
    """Per arm and row: every seed and the seed mean (± half-range) on the in-distribution mean and
    each unseen hop count; the shortcut floor first."""
    unseen = mh["unseen_hops"]
    out = [f"| arm | model | T | seed | in-dist. EM (hops 1..{mh['train_hops']}) | "
           + " | ".join(f"{h} hops" for h in unseen) + " |", "|---|---|---|---|---:|" + "---:|" * len(unseen)]
    if mh.get("floor"):
        cells = " | ".join(fmt_cell(mh["floor"].get(h), ".3f") for h in unseen)
        out.append(f"| - | shortcut floor | best fixed trained depth | - | 1.000 | {cells} |")
    for key in mh.get("arms", ARMS):
        arm = mh[key]
        for row in arm["rows"]:
            ind, head = row["in_distribution"], f"| {key} | {_arm_name(arm)} | {row['label']} |"
            for i, seed in enumerate(arm["seeds"]):
                cells = " | ".join(fmt_cell(row["unseen_per_seed"][i][h], ".3f") for h in unseen)
                out.append(f"{head} {seed} | {ind['per_seed'][i]:.3f} | {cells} |")
            cells = " | ".join(f"{row['curve'][h]['mean']:.3f} ({row['curve'][h]['min']:.2f}-"
                               f"{row['curve'][h]['max']:.2f})" for h in unseen)
            out.append(f"{head} **mean** | **{ind['mean']:.3f}** (± {ind['half_range']:.3f}) | {cells} |")
    return out


def _mh_fixed_table(mh: dict[str, Any]) -> list[str]:
    """The RDT's fixed-T sweep: one T for every query, seed-mean EM per hop count (min-max)."""
    arm, hops = mh["a"], mh["hops"]
    if not arm.get("fixed_T"):
        return []
    out = [f"Fixed T (one loop count for every query, no oracle), {arm['name']}: seed mean (min-max over "
           f"{len(arm['seeds'])} seeds).", "",
           "| T | in-dist. EM | " + " | ".join(f"{h}" for h in hops) + " |", "|---:|---:|" + "---:|" * len(hops)]
    for t, row in arm["fixed_T"].items():
        ind = row["in_distribution"]
        out.append(f"| {t} | {ind['mean']:.3f} (± {ind['half_range']:.3f}) | " + " | ".join(
            f"{row['curve'][h]['mean']:.2f} ({row['curve'][h]['min']:.2f}-{row['curve'][h]['max']:.2f})"
            for h in hops) + " |")
    return out


def _mh_exit_table(mh: dict[str, Any]) -> list[str]:
    """Per adaptive exit: the mean T the model chose per hop count (seed mean, min-max) against the
    T an oracle would give (hops + 1), and the exact match it got."""
    arm, hops = mh["a"], mh["hops"]
    rows = [r for r in arm["rows"] if "chosen_T" in r]
    if not rows:
        return []
    out = [f"Adaptive exit, {arm['name']}: the loop count the model chose by itself, per hop count (seed mean, "
           "min-max over seeds), and its exact match.", "",
           "| exit | | " + " | ".join(f"{h} hops" for h in hops) + " |", "|---|---|" + "---:|" * len(hops),
           "| (oracle) | T = hops + 1 | " + " | ".join(str(int(h) + 1) for h in hops) + " |"]
    for r in rows:
        if r.get("max_loops") and "loops_per_query" in r:
            lq = r["loops_per_query"]
            out.append(f"| {r['label']} | core row-iterations | {lq['mean']:.2f} per query ({lq['min']:.2f}-"
                       f"{lq['max']:.2f}) vs {r['max_loops']} at fixed T = {r['max_loops']}: "
                       f"{1 - lq['mean'] / r['max_loops']:.0%} saved |" + " |" * (len(hops) - 1))
        out.append(f"| {r['label']} | mean T chosen | " + " | ".join(
            f"{r['chosen_T'][h]['mean']:.1f} ({r['chosen_T'][h]['min']:.1f}-{r['chosen_T'][h]['max']:.1f})"
            for h in hops) + " |")
        out.append(f"| {r['label']} | exact match | " + " | ".join(
            f"{r['curve'][h]['mean']:.2f} ({r['curve'][h]['min']:.2f}-{r['curve'][h]['max']:.2f})"
            for h in hops) + " |")
    return out


def multihop_lines(mh: dict[str, Any]) -> list[str]:
    """The multi-hop section of report.md."""
    return ["## Multi-hop task", "", f"Trained on hops 1..{mh['train_hops']}; exact-match accuracy on "
            "held-out test queries. The RDT is never told a query's depth: it runs one T for every query "
            "(the sweep below; best fixed T is chosen by the seed-mean in-distribution accuracy on these same "
            "test queries) or exits by itself (adaptive exit). The T = hops + 1 row is an **oracle upper "
            "bound**, not a result: it is told the depth. Dense baselines: iso-parameters (one block) and "
            "iso-depth (as many layers as the RDT's loops on 5 and on 10 hops). Chance (uniform guess): "
            f"{fmt_cell(mh['chance'], '.4f')}."
            + (" Shortcut floor: the best accuracy of answering every query of a hop count with "
               f"pi^j(start) for one trained depth j <= {mh['train_hops']} (what a model that runs a fixed "
               "trained depth gets for free); depth extrapolation means accuracy above it."
               if mh.get("floor") else ""), "",
            *_mh_table(mh), "", *_mh_exit_table(mh), "", *_mh_fixed_table(mh), "",
            "![multi-hop accuracy](multihop_accuracy.png)", ""]


def multihop_console_lines(mh: dict[str, Any]) -> list[str]:
    """Two lines per report: each arm's primary in-distribution EM, then its unseen-hop curve."""
    keys = mh.get("arms", ARMS)
    ind = " | ".join(f"{mh[k]['name']} {mh[k]['in_distribution']['key']} "
                     f"{mh[k]['in_distribution']['mean']:.3f}" for k in keys)
    return [f"multihop in-distribution EM (hops 1..{mh['train_hops']}): {ind}",
            "unseen hops " + ",".join(mh["unseen_hops"]) + ": " + " | ".join(
                f"{mh[k]['name']} " + " ".join(f"{v:.2f}" for v in mh[k]["unseen"].values()) for k in keys)]


def load_multihop_arms(rdt: Sequence[str], dense: Sequence[Sequence[str]], train_hops: int
                       ) -> tuple[dict[str, list[Run]], list[str]]:
    """``{"a": RDT runs, "b": first dense arm, "c": ...}`` and the data-check lines: every dense arm
    is seed-paired with the RDT arm on identical data, and all ran the same test set."""
    arms = {"a": [load_run(p) for p in rdt]}
    for key, paths in zip("bcdefgh", dense):
        arms[key] = [load_run(p) for p in paths]
    lines = []
    for key in list(arms)[1:]:
        what = "multihop runs" if key == "b" else f"multihop runs (arm {key} as arm b)"
        lines += [ln for ln in check_arms(arms["a"], arms[key], what) if ln not in lines]
    check_test_sets([r for runs in arms.values() for r in runs], train_hops)
    return arms, lines
