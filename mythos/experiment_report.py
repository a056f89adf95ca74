"""The report of the experiment pipeline: RDT (arm a) vs dense (arm b), several seeds per arm.

    mythos-experiment-report --out DIR \\
        --lm-a RUN [RUN ...] --lm-b RUN [RUN ...] --plan PLAN_JSON \\   # one LM comparison; repeat
        [--lm-a ... --lm-b ... --plan ...] \\                          # the three for each comparison
        [--mh-a RUN [RUN ...] --mh-b RUN [RUN ...] [--mh-extra RUN [RUN ...]] ...] [--train-hops 5]

An LM *comparison* is one RDT arm against one dense arm (one run per seed, same seed order) under
one plan (``mythos-plan``'s plan.json: a size and a matching, ``compute`` or ``tokens``); repeat
``--lm-a/--lm-b/--plan`` for every size x matching (`make experiment`: two sizes, both
matchings, the RDT runs shared by a size's two comparisons). Matched compute is the headline.
**Identical data is checked, not assumed** (:func:`mythos.compare.data_check`, each a-run against
the b-run of its index and every run against its arm's first): a data difference, a differing
seed (``train.seed`` in ``config.resolved.yaml``), a run that trained other tokens than its plan,
or a differing multi-hop test set is refused (exit 2, one line).

The LM numbers (:mod:`mythos.experiment_lm`): the ratio table (the analogue pairs against
rdt-770m / dense-1.3b, from :func:`mythos.accounting.pair_ratios`, rows more than 10% off
flagged), per comparison the gap of the seed means with a 95% Welch interval and the seed noise,
the loop-use check and the trend over sizes. Multi-hop runs: ``eval/results.json`` with a
``multihop`` section (``mythos-eval --multihop``).

Writes ``report.md``, ``summary.json`` (see :func:`main`) and PNGs (``loss_vs_flops_<rdt>``,
``loss_vs_loops``, ``scaling``, ``multihop_accuracy``) to ``--out``. Spreads are min..max over
seeds. Final val loss: ``mythos-eval``'s whole-split loss when every LM run of a comparison has one
(the RDT at its default depth, E[T]), else the trainer's last periodic eval. In-distribution exact
match: the unweighted mean over hops 1..``--train-hops``; the RDT's "best fixed T" is chosen by
its seed-mean in-distribution accuracy on the same test queries.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mythos.cli_common import ArgumentParser, fail
from mythos.compare import CompareError, Run, fmt_cell, load_run
from mythos.experiment_lm import ARMS, check_arms, comparison, loop_use, ratio_table, run_model_config, trend
from mythos.experiment_lm import seed_of as _seed
from mythos.experiment_lm import stats as _stats
from mythos.experiment_plots import plot_loops, plot_loss, plot_multihop, plot_scaling
from mythos.io import atomic_write_text

# ---------------------------------------------------------------------------------------------
# multi-hop


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


# ---------------------------------------------------------------------------------------------
# LM sections of report.md


def _ratio_lines(rt: dict[str, Any], comps: Sequence[dict[str, Any]]) -> list[str]:
    ref, ans = rt["reference"], rt["analogues"]
    out = [f"| quantity | {ref['name']} | " + " | ".join(a["name"] for a in ans) + " |",
           "|---|---:|" + "---:|" * len(ans)]

    def cell(a: dict[str, Any], k: str, share: bool) -> str:
        v = a["ratios"][k]
        mark = " **(off)**" if k in a["flags"] else ""
        if share:
            return f"{v:.3f}{mark}"
        return f"{v:.3f} ({100 * (v / ref['ratios'][k] - 1):+.1f}%){mark}"

    for k, label in rt["rows"].items():
        out.append(f"| {label} | {ref['ratios'][k]:.3f} | " + " | ".join(cell(a, k, False) for a in ans) + " |")
    for k, label in rt["share_rows"].items():
        out.append(f"| {label} | {ref['ratios'][k]:.3f} | " + " | ".join(cell(a, k, True) for a in ans) + " |")
    cells = []
    for a in ans:
        mine = [c for c in comps if c.get("models") == a["models"]]
        c = next((x for x in mine if x["match"] == "compute"), mine[0] if mine else None)
        ta, tb = (c["a"]["tokens_per_param"], c["b"]["tokens_per_param"]) if c else (None, None)
        low = " **(below 10)**" if ta is not None and ta < 10 else ""
        cells.append(f"{fmt_cell(ta, '.1f')} / {fmt_cell(tb, '.1f')}{low}")
    out.append("| tokens per parameter, RDT / dense (matched compute) | 79.3 / 78.0 (Parcae: 61.6B / 104B "
               "tokens, 80 per parameter each) | "
               + " | ".join(cells) + " |")
    flagged = [f"{a['name']}: {', '.join(a['flags'])}" for a in ans if a["flags"]]
    out += ["", f"Ratio rows are flagged **(off)** when more than {100 * rt['tolerance']:.0f}% from the cluster "
            "pair's; head shares when above 15%. " + ("Flagged: " + "; ".join(flagged) + "." if flagged
                                                      else "No row is flagged.")]
    return out


def _comparison_lines(c: dict[str, Any]) -> list[str]:
    out = ["| arm | model | params | tokens trained | tokens/param | model FLOPs trained | "
           "final val loss (mean ± half-range) | per seed |", "|---|---|---:|---:|---:|---:|---:|---|"]
    for key in ARMS:
        s, v = c[key], c[key]["final_val_loss"]
        tr, fl = s["tokens_trained"], s["model_flops_trained"]
        out.append(
            f"| {key} | {s['name']} ({s['kind']}) | {fmt_cell(s['params'], ',.0f')} | "
            f"{fmt_cell(statistics.fmean(tr) if all(tr) else None, ',.0f')} | "
            f"{fmt_cell(s['tokens_per_param'], '.1f')} | "
            f"{fmt_cell(statistics.fmean(fl) if all(fl) else None, '.3e')} | {v['mean']:.4f} ± {v['half_range']:.4f} | "
            + ", ".join(f"{sd}: {x:.4f}" for sd, x in zip(s["seeds"], v["per_seed"])) + " |")
    return [*out, "", _gap_sentence(c)]


def _gap_sentence(c: dict[str, Any]) -> str:
    a, b = c["a"], c["b"]
    head = (f"Mean final val loss: {a['name']} {a['final_val_loss']['mean']:.4f}, {b['name']} "
            f"{b['final_val_loss']['mean']:.4f}; gap (a - b) = **{c['gap']:+.4f}**")
    iv = c["interval"]
    head += f" (95% Welch interval {iv[0]:+.4f} .. {iv[1]:+.4f})." if iv else "."
    if c["noise"] is None:
        return f"{head} One seed per arm: seed noise was not measured, so this gap says nothing on its own."
    verdict = {"inside noise": "**the gap is inside the noise**: this comparison does not tell the arms apart",
               "a ahead": f"**{a['name']} is ahead** beyond the noise", "b ahead":
               f"**{b['name']} is ahead** beyond the noise"}[c["verdict"]]
    return (f"{head} Seed noise (the larger within-arm max - min over {len(a['seeds'])} seeds) = "
            f"{c['noise']:.4f}; {verdict}. Model FLOPs a/b = {fmt_cell(c['flops_ratio_a_over_b'], '.3f')}.")


def _loop_use_lines(name: str, lu: dict[str, Any]) -> list[str]:
    t, loss = lu["T"], lu["loss"]
    used = ("the loop is used" if lu["loop_used"] else "**the loop is unused** (one iteration is as good as "
            "E[T] within the noise)")
    hurt = ("**more loops hurt**" if lu["more_loops_hurt"] else "more loops do not hurt")
    return [f"- {name}: val loss at T = {t['1']} / {t['E']} (E[T]) / {t['2E']} / {t['4E']}: "
            f"{loss['1']:.4f} / {loss['E']:.4f} / {loss['2E']:.4f} / {loss['4E']:.4f}; "
            f"loss(1) - loss(E[T]) = {lu['gain']:+.4f}, loss(2E[T]) - loss(E[T]) = {lu['extra_2x']:+.4f}, "
            f"loss(4E[T]) - loss(E[T]) = {lu['extra_4x']:+.4f} (threshold {lu['threshold']:.4f}): {used}; {hurt}."]


def _trend_lines(tr: list[dict[str, Any]]) -> list[str]:
    def g(row: dict[str, Any], m: str) -> str:
        c = row.get(m)
        if not c:
            return "-"
        iv = c["interval"]
        return (f"{c['gap']:+.4f}" + (f" [{iv[0]:+.3f}, {iv[1]:+.3f}]" if iv else "") + f" ({c['verdict']})")

    out = ["| RDT | dense | params a / b | RDT training FLOPs | gap, matched compute [95%] | "
           "gap, matched tokens [95%] |", "|---|---|---:|---:|---:|---:|"]
    for r in tr:
        out.append(f"| {r['rdt']} | {r['dense']} | {fmt_cell(r['params_a'], ',.0f')} / "
                   f"{fmt_cell(r['params_b'], ',.0f')} | {fmt_cell(r['rdt_flops'], '.3e')} | {g(r, 'compute')} | "
                   f"{g(r, 'tokens')} |")
    if len(tr) >= 2 and all(r.get("compute") for r in tr):
        lo, hi = tr[0], tr[-1]
        x = hi["rdt_flops"] / lo["rdt_flops"] if lo["rdt_flops"] and hi["rdt_flops"] else None
        d = hi["compute"]["gap"] - lo["compute"]["gap"]
        out += ["", f"From {lo['rdt']} to {hi['rdt']} ({fmt_cell(x, '.2f')}x the compute) the matched-compute gap "
                f"moves by {d:+.4f} (from {lo['compute']['gap']:+.4f} to {hi['compute']['gap']:+.4f}; a negative "
                "gap favours the RDT). Two points are a direction, not a law."]
    return out


def _lm_lines(lm: dict[str, Any]) -> list[str]:
    comps = lm["comparisons"]
    out: list[str] = []
    if lm.get("ratios"):
        out += ["## Is the analogue a scale model of the cluster pair?", "",
                "From `mythos.accounting.pair_ratios` (exact parameter counts, training model FLOPs per token "
                "with the RDT at E[T] forward and E[min(T, bwd_depth)] backward).", "",
                *_ratio_lines(lm["ratios"], comps), ""]
    else:
        out += [f"(No ratio table: {lm.get('ratios_note')}.)", ""]
    for match, title in (("compute", "Matched compute (the headline)"), ("tokens", "Matched tokens")):
        sel = [c for c in comps if c["match"] == match]
        if not sel:
            continue
        out += [f"## Language modelling: {title.lower()}", ""]
        for c in sel:
            out += [f"### {c['a']['name']} vs {c['b']['name']}", "", f"Plan: {c['description']}", "",
                    *_comparison_lines(c), ""]
    other = [c for c in comps if c["match"] not in ("compute", "tokens")]
    for c in other:
        out += [f"## {c['a']['name']} vs {c['b']['name']} ({c['match'] or 'no plan'})", "", *_comparison_lines(c), ""]
    if lm["loop_use"] or any(c["a"]["loss_by_loops"] for c in comps):
        out += ["## Loop use", "", "Does the RDT use its loop? Val loss at one iteration, at E[T] and at 2x / 4x "
                "E[T] (seed means):", ""]
        for name, lu in lm["loop_use"].items():
            out += _loop_use_lines(name, lu)
        for c in comps:
            if c["a"]["name"] not in lm["loop_use"] and (by := c["a"]["loss_by_loops"]):
                out.append(f"- {c['a']['name']} (no E[T] in its plan, so no check): " + ", ".join(
                    f"T={t}: {by[t]['mean']:.4f}" for t in sorted(by, key=int)))
                break
        out += ["", "![loss vs loops](loss_vs_loops.png)", ""]
    if len(lm["trend"]) >= 2:
        out += ["## Trend over sizes", "", *_trend_lines(lm["trend"]), "", "![scaling](scaling.png)", ""]
    out += ["## Loss curves", ""]
    out += [f"![{n}](loss_vs_flops_{n}.png)" + "\n" for n in dict.fromkeys(c["a"]["name"] for c in comps)]
    return out


def lm_summary(groups: Sequence[tuple[list[Run], list[Run], dict[str, Any] | None]]) -> dict[str, Any]:
    """The LM section of summary.json: ``comparisons`` (:func:`mythos.experiment_lm.comparison`
    per group), ``ratios`` (the ratio table of the groups' distinct pairs; None when a run has no
    readable model config, with ``ratios_note``), ``loop_use`` per RDT model and ``trend``."""
    comps = [comparison(a, b, plan) for a, b, plan in groups]
    pairs, note = {}, None
    try:
        for (a, b, plan), c in zip(groups, comps):
            seq = (plan["arms"][0].get("seq_len") if plan else None) or a[0].info.get("seq_len")
            ma, mb = run_model_config(a[0]), run_model_config(b[0])
            pairs.setdefault((ma.name, mb.name), (ma, mb, int(seq or ma.max_seq_len)))
            c["models"] = [ma.name, mb.name]
    except CompareError as exc:
        note = str(exc)
    uses = {}
    for c in comps:
        if c["a"]["kind"] == "rdt" and c["a"]["name"] not in uses and (lu := loop_use(c)) is not None:
            uses[c["a"]["name"]] = lu
    return {"comparisons": comps, "ratios": ratio_table(list(pairs.values())) if note is None else None,
            "ratios_note": note, "loop_use": uses, "trend": trend(comps)}


def write_report(out: Path, lm: dict[str, Any], mh: dict[str, Any] | None, data_lines: list[str]) -> Path:
    """``out/report.md`` from the summaries (the PNGs are already written)."""
    comps = lm["comparisons"]
    names = " / ".join(dict.fromkeys(f"{c['a']['name']} vs {c['b']['name']}" for c in comps))
    n = len(comps[0]["a"]["seeds"])
    lines = [f"# {names}: {n} seed(s) per arm, identical data", ""]
    for c in comps:
        lines += [f"- LM ({c['match'] or 'no plan'}): arm a " + ", ".join(f"`{p}`" for p in c["a"]["runs"])
                  + "; arm b " + ", ".join(f"`{p}`" for p in c["b"]["runs"])]
    if mh:
        lines += [f"- Multi-hop runs, arm {k}: " + ", ".join(f"`{p}`" for p in mh[k]["runs"]) for k in mh["arms"]]
    lines += ["- Data checks (mythos.compare.data_check), all passed:", *(f"  - {ln}" for ln in data_lines), ""]
    lines += _lm_lines(lm)
    if mh:
        lines += multihop_lines(mh)
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def console_lines(lm: dict[str, Any], mh: dict[str, Any] | None) -> list[str]:
    """The summary ``main`` prints: a line per LM comparison, the loop-use check, multi-hop lines."""
    lines = []
    for c in lm["comparisons"]:
        a, b, iv = c["a"], c["b"], c["interval"]
        lines.append(f"{a['name']} vs {b['name']} (matched {c['match']}): val loss {a['final_val_loss']['mean']:.4f} "
                     f"vs {b['final_val_loss']['mean']:.4f}, gap {c['gap']:+.4f}"
                     + (f" [{iv[0]:+.4f}, {iv[1]:+.4f}]" if iv else "")
                     + f", seed noise {fmt_cell(c['noise'])}: {c['verdict']}")
    for name, lu in lm["loop_use"].items():
        lines.append(f"{name} loop use: loss(1) - loss(E[T]) {lu['gain']:+.4f}, loss(2E[T]) - loss(E[T]) "
                     f"{lu['extra_2x']:+.4f}, loss(4E[T]) - loss(E[T]) {lu['extra_4x']:+.4f}: "
                     + ("used" if lu["loop_used"] else "UNUSED")
                     + ("; more loops HURT" if lu["more_loops_hurt"] else ""))
    if lm.get("ratios"):
        flagged = [a["name"] for a in lm["ratios"]["analogues"] if a["flags"]]
        lines.append("ratio table vs the cluster pair: " + (f"OFF by >10% for {', '.join(flagged)}" if flagged
                                                            else "every row within 10%"))
    if mh:
        lines += multihop_console_lines(mh)
    return lines


def build_parser() -> ArgumentParser:
    """The ``mythos-experiment-report`` argument parser."""
    ap = ArgumentParser(prog="mythos-experiment-report", description=__doc__)
    ap.add_argument("--out", required=True, metavar="DIR", help="report directory")
    ap.add_argument("--lm-a", nargs="+", required=True, action="append", metavar="RUN",
                    help="arm a (RDT) LM runs of one comparison, one per seed; repeat per comparison")
    ap.add_argument("--lm-b", nargs="+", required=True, action="append", metavar="RUN",
                    help="arm b (dense) LM runs of the same comparison, same seed order")
    ap.add_argument("--plan", action="append", default=None, metavar="PLAN_JSON",
                    help="plan.json of the comparison (mythos-plan); give one per comparison or none (default: none)")
    ap.add_argument("--mh-a", nargs="+", default=None, metavar="RUN", help="arm a multi-hop runs, one per seed")
    ap.add_argument("--mh-b", nargs="+", default=None, metavar="RUN", help="arm b multi-hop runs, same seeds")
    ap.add_argument("--mh-extra", nargs="+", action="append", default=[], metavar="RUN",
                    help="one more dense multi-hop baseline (arms c, d, ...), same seeds; repeat per baseline")
    ap.add_argument("--train-hops", type=int, default=5, metavar="N", help="multi-hop runs trained on hops 1..N")
    return ap


def _load_plan(path: str, runs: dict[str, list[Run]]) -> dict[str, Any]:
    """``--plan``'s plan.json; refused unless its two arms have the kinds of the LM arms' runs."""
    try:
        plan = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CompareError(f"--plan {path}: not a readable plan.json ({exc})") from None
    if not isinstance(plan, dict) or len(plan.get("arms") or []) != 2:
        raise CompareError(f"--plan {path}: expected the two arms of a mythos-plan plan.json")
    for key, arm in zip(ARMS, plan["arms"]):
        if arm.get("kind") != runs[key][0].kind:
            raise CompareError(f"--plan {path}: plan arm {key} is {arm.get('name')} ({arm.get('kind')}) but "
                               f"{runs[key][0].path} is {runs[key][0].kind}: the plan is not of these runs")
    return plan


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; 0 on success, 2 on bad input (one ``error:`` line). summary.json is
    ``{"lm": lm_summary(...), "multihop": multihop_summary(...) | None}``."""
    a = build_parser().parse_args(argv)
    if (a.mh_a is None) != (a.mh_b is None):
        return fail("give both --mh-a and --mh-b, or neither")
    if a.mh_extra and not a.mh_a:
        return fail("--mh-extra needs --mh-a and --mh-b")
    if len(a.lm_a) != len(a.lm_b):
        return fail(f"{len(a.lm_a)} --lm-a groups but {len(a.lm_b)} --lm-b groups: give both per comparison")
    if a.plan is not None and len(a.plan) != len(a.lm_a):
        return fail(f"{len(a.plan)} --plan for {len(a.lm_a)} LM comparisons: give one per comparison, or none")
    if a.train_hops < 1:
        return fail(f"--train-hops must be >= 1, got {a.train_hops}")
    out = Path(a.out)
    try:
        cache: dict[str, Run] = {}
        load = lambda p: cache.setdefault(p, load_run(p))  # noqa: E731 -- a comparison may share runs
        groups, data_lines = [], []
        for i, (ga, gb) in enumerate(zip(a.lm_a, a.lm_b)):
            runs = {"a": [load(p) for p in ga], "b": [load(p) for p in gb]}
            plan = _load_plan(a.plan[i], runs) if a.plan else None
            data_lines += [ln for ln in check_arms(runs["a"], runs["b"], "LM runs") if ln not in data_lines]
            groups.append((runs["a"], runs["b"], plan))
        mh_runs = None
        if a.mh_a:
            mh_runs, mh_lines = load_multihop_arms(a.mh_a, [a.mh_b, *a.mh_extra], a.train_hops)
            data_lines += mh_lines
        lm = lm_summary(groups)
        mh = multihop_summary(mh_runs, a.train_hops) if mh_runs else None
    except (CompareError, KeyError, ValueError) as exc:
        return fail(exc if isinstance(exc, CompareError) else f"malformed input: {type(exc).__name__}: {exc}")
    out.mkdir(parents=True, exist_ok=True)
    curves: dict[str, tuple[list[Run], list[Run]]] = {}
    for (ga, gb, _), c in zip(groups, lm["comparisons"]):
        if c["a"]["name"] not in curves or c["match"] == "compute":  # the headline's dense arm
            curves[c["a"]["name"]] = (ga, gb)
    for name, (ga, gb) in curves.items():
        plot_loss({"a": ga, "b": gb}, "train/flops", "training FLOPs (model)", out / f"loss_vs_flops_{name}.png")
    if lm["loop_use"] or any(c["a"]["loss_by_loops"] for c in lm["comparisons"]):
        plot_loops(lm["comparisons"], out / "loss_vs_loops.png")
    if len(lm["trend"]) >= 2:
        plot_scaling(lm["comparisons"], out / "scaling.png")
    if mh:
        plot_multihop(mh, out / "multihop_accuracy.png")
    atomic_write_text(out / "summary.json", json.dumps({"lm": lm, "multihop": mh}, indent=2) + "\n")
    report = write_report(out, lm, mh, data_lines)
    print("\n".join(console_lines(lm, mh)))
    print(f"wrote {report} and {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
