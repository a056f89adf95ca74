"""The report of the experiment pipeline: RDT (arm a) vs dense (arm b), several seeds per arm.

    mythos-experiment-report --out DIR \\
        --lm-a RUN [RUN ...] --lm-b RUN [RUN ...] --plan PLAN_JSON \\   # one LM comparison; repeat
        [--lm-a ... --lm-b ... --plan ...] \\                          # the three for each comparison
        [--mh-a RUN [RUN ...] --mh-b RUN [RUN ...] [--mh-extra RUN [RUN ...]] ...] [--train-hops 5]

An LM *comparison* is one RDT arm against one dense arm (one run per seed, same seed order) under
one plan (``mythos-plan``'s plan.json: a size and a matching, ``compute`` or ``tokens``); repeat
``--lm-a/--lm-b/--plan`` for every size x matching (`make experiment`: two sizes, both
matchings, the RDT runs shared by a size's two comparisons). Matched compute is the headline.
**Identical data is checked, not assumed** (:func:`mythos.tools.runs.data_check`, each a-run against
the b-run of its index and every run against its arm's first): a data difference, a differing
seed (``train.seed`` in ``config.resolved.yaml``), a run that trained other tokens than its plan,
or a differing multi-hop test set is refused (exit 2, one line).

The LM numbers (:mod:`mythos.tools.experiment_lm`): the ratio table (the analogue pairs against
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

from mythos.cli_common import ArgumentParser, fail, prepare_out_dir
from mythos.config import ConfigError
from mythos.io import atomic_write_text
from mythos.tools.experiment_lm import ARMS, check_arms, comparison, loop_use, ratio_table, run_model_config, trend
from mythos.tools.experiment_multihop import (
    load_multihop_arms,
    multihop_console_lines,
    multihop_lines,
    multihop_summary,
)
from mythos.tools.experiment_plots import plot_loops, plot_loss, plot_multihop, plot_scaling
from mythos.tools.runs import CompareError, Run, budget_check, fmt_cell, load_run

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
               "unresolved": f"the gap is beyond the seed spread, but **not resolved**: with {len(a['seeds'])} "
               "seeds per arm the 95% interval still holds 0",
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
    """The LM section of summary.json: ``comparisons`` (:func:`mythos.tools.experiment_lm.comparison`
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
    lines += ["- Data checks (mythos.tools.runs.data_check), all passed:", *(f"  - {ln}" for ln in data_lines), ""]
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
    ap.add_argument("--mh-a", nargs="+", default=None, metavar="RUN",
                    help="arm a multi-hop runs, one per seed (default: none, no multi-hop section)")
    ap.add_argument("--mh-b", nargs="+", default=None, metavar="RUN",
                    help="arm b multi-hop runs, same seeds (default: none)")
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
    try:
        out = prepare_out_dir(a.out)
    except ConfigError as exc:
        return fail(exc)
    try:
        cache: dict[str, Run] = {}
        load = lambda p: cache.setdefault(p, load_run(p))  # noqa: E731 -- a comparison may share runs
        groups, data_lines = [], []
        for i, (ga, gb) in enumerate(zip(a.lm_a, a.lm_b)):
            runs = {"a": [load(p) for p in ga], "b": [load(p) for p in gb]}
            plan = _load_plan(a.plan[i], runs) if a.plan else None
            data_lines += [ln for ln in check_arms(runs["a"], runs["b"], "LM runs") if ln not in data_lines]
            if plan is None:  # a plan states its own match (it may be tokens-per-param); without one, insist
                for x, y in zip(runs["a"], runs["b"]):
                    if (match := budget_check(x, y))[0] is None:
                        raise CompareError(f"LM runs {x.path} vs {y.path}: {match[1]}; give the --plan they were "
                                           "trained from, or runs with equal budgets")
            groups.append((runs["a"], runs["b"], plan))
        mh_runs = None
        if a.mh_a:
            mh_runs, mh_lines = load_multihop_arms(a.mh_a, [a.mh_b, *a.mh_extra], a.train_hops)
            data_lines += mh_lines
        lm = lm_summary(groups)
        mh = multihop_summary(mh_runs, a.train_hops) if mh_runs else None
    except (CompareError, KeyError, ValueError) as exc:
        return fail(exc if isinstance(exc, CompareError) else f"malformed input: {type(exc).__name__}: {exc}")
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
