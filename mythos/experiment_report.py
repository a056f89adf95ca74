"""The report of the experiment pipeline: RDT (arm a) vs dense (arm b), several seeds per arm.

    python -m mythos.experiment_report --out DIR --lm-a RUN [RUN ...] --lm-b RUN [RUN ...] \\
        [--mh-a RUN [RUN ...] --mh-b RUN [RUN ...]] [--plan PLAN_JSON] [--train-hops 5]

Inputs: LM runs per arm, one per seed in the same seed order; multi-hop runs (``eval/results.json``
with a ``multihop`` section, ``python -m mythos.eval --multihop``); the LM pair's ``plan.json``.
**Identical data is checked, not assumed** (:func:`mythos.compare.data_check`, each a-run against
the b-run of its index and every run against its arm's first): a data difference, a differing
seed (``train.seed`` in ``config.resolved.yaml``) or multi-hop test set is refused (exit 2, one line).

Writes ``report.md``, ``summary.json`` (see :func:`main`) and PNGs (``loss_vs_tokens``,
``loss_vs_flops``, ``loss_vs_loops``, ``multihop_accuracy``) to ``--out``. Spreads are min..max
over seeds. Final val loss: ``mythos.eval``'s whole-split loss when every LM run has one (the RDT
at its default depth), else the trainer's last periodic eval, for all runs. In-distribution exact
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
from mythos.compare import CompareError, Run, data_check, fmt_cell, load_run
from mythos.config import ConfigError, load_yaml
from mythos.experiment_plots import plot_loops, plot_loss, plot_multihop
from mythos.io import atomic_write_text

ARMS = ("a", "b")


def _seed(run: Run) -> str | None:
    """``"seed N"`` from ``train.seed`` in the run's ``config.resolved.yaml``; None when not readable."""
    try:
        seed = (load_yaml(run.path / "config.resolved.yaml").get("train") or {}).get("seed")
    except ConfigError:
        return None
    return f"seed {seed}" if seed is not None else None


def check_arms(a: Sequence[Run], b: Sequence[Run], what: str) -> list[str]:
    """Raise :class:`CompareError` unless the arms are one model each, seed-paired and trained on
    identical data; returns the data-check lines (one per pair checked)."""
    if len(a) != len(b):
        raise CompareError(f"{what}: {len(a)} runs in arm a but {len(b)} in arm b (one run per seed in each)")
    for arm in (a, b):
        if len(models := {(r.kind, r.name) for r in arm}) > 1:
            raise CompareError(f"{what}: one arm mixes models {sorted(models)} ({', '.join(str(r.path) for r in arm)})")
    lines = []
    pairs = [(x, y, True) for x, y in zip(a, b)] + [(arm[0], r, False) for arm in (a, b) for r in arm[1:]]
    for x, y, same_seed in pairs:
        sx, sy = _seed(x), _seed(y)
        if same_seed and sx is not None and sy is not None and sx != sy:
            raise CompareError(f"{what}: {x.path} ({sx}) is paired with {y.path} ({sy}): give the same seed order")
        ok, line = data_check(x, y)
        if not ok:
            raise CompareError(f"{what}: {x.path} vs {y.path}: {line}; refusing")
        lines.append(f"{x.path.name} vs {y.path.name}: {line}")
    return lines


def _stats(xs: Sequence[float]) -> dict[str, Any]:
    """Mean, min, max, half-range (``(max - min) / 2``) and the per-seed values."""
    return {"mean": statistics.fmean(xs), "min": min(xs), "max": max(xs), "half_range": (max(xs) - min(xs)) / 2,
            "per_seed": list(xs)}


# ---------------------------------------------------------------------------------------------
# LM arms


def final_val_losses(runs: Sequence[Run]) -> tuple[list[float], str]:
    """Each run's final val loss and its source (``eval`` when every run has ``mythos.eval``'s
    ``lm.loss``, else ``training``: the last periodic eval)."""
    if all(((r.eval or {}).get("lm") or {}).get("loss") is not None for r in runs):
        return [float(r.eval["lm"]["loss"]) for r in runs], "eval"  # type: ignore[index]
    missing = [str(r.path) for r in runs if not r.val]
    if missing:
        raise CompareError(f"no val loss in {', '.join(missing)} (no eval/results.json and no periodic val/loss)")
    return [float(r.val[-1]["val/loss"]) for r in runs], "training"


def loop_curve(run: Run, source: str) -> dict[int, float]:
    """RDT val loss per loop count, from the same source as the final val loss."""
    if source == "eval":
        by = ((run.eval or {}).get("lm") or {}).get("by_loops") or {}
        return {int(t): float(v["loss"]) for t, v in by.items()}
    last = run.val[-1] if run.val else {}
    return {int(k.split("@")[1]): float(v) for k, v in last.items() if k.startswith("val/loss@")}


def lm_summary(a: Sequence[Run], b: Sequence[Run], plan: dict[str, Any] | None) -> dict[str, Any]:
    """The LM section of summary.json: per arm the runs, seeds, params/tokens/FLOPs and final val
    loss statistics; the gap of the means (a - b), the seed noise (the larger within-arm max - min;
    None with one seed) and whether |gap| exceeds it."""
    losses, source = final_val_losses([*a, *b])
    out: dict[str, Any] = {"val_loss_source": source}
    for i, (key, runs) in enumerate(zip(ARMS, (a, b))):
        pl = plan["arms"][i] if plan else {}
        vals = losses[:len(a)] if key == "a" else losses[len(a):]
        curves = [loop_curve(r, source) for r in runs]
        common = sorted(set.intersection(*(set(c) for c in curves))) if all(curves) else []
        out[key] = {
            "name": runs[0].name, "kind": runs[0].kind, "runs": [str(r.path) for r in runs],
            "seeds": [_seed(r) or r.path.name for r in runs], "params_run": runs[0].info.get("params"),
            "params": pl.get("params", runs[0].info.get("params")), "tokens_plan": pl.get("tokens"),
            "tokens_trained": [r.train[-1].get("train/tokens") for r in runs],
            "model_flops_plan": pl.get("model_flops"), "hardware_flops_plan": pl.get("hardware_flops"),
            "model_flops_trained": [r.train[-1].get("train/flops") for r in runs],
            "final_val_loss": _stats(vals), "loss_by_loops": {str(t): _stats([c[t] for c in curves]) for t in common}}
    pa, pb = out["a"]["params"], out["b"]["params"]
    out["params_ratio_a_over_b"] = pa / pb if pa and pb else None
    out["gap"] = out["a"]["final_val_loss"]["mean"] - out["b"]["final_val_loss"]["mean"]
    spread = [out[k]["final_val_loss"]["max"] - out[k]["final_val_loss"]["min"] for k in ARMS]
    out["noise"] = max(spread) if len(a) > 1 else None
    out["gap_exceeds_noise"] = abs(out["gap"]) > out["noise"] if out["noise"] is not None else None
    return out


def _mh(run: Run) -> dict[str, Any]:
    mh = (run.eval or {}).get("multihop")
    if not mh or not mh.get("accuracy") or not mh.get("count"):
        raise CompareError(f"{run.path}: no multihop section in eval/results.json (run python -m mythos.eval "
                           f"--run {run.path} --multihop TASK_DIR)")
    return mh


def check_test_sets(runs: Sequence[Run], train_hops: int) -> None:
    """All multi-hop runs were evaluated on the same test set, trained on hops 1..``train_hops``."""
    ref = _mh(runs[0])
    for r in runs:
        mh = _mh(r)
        if mh["count"] != ref["count"] or mh.get("data_hash") != ref.get("data_hash"):
            raise CompareError(f"multihop test sets differ (task hash or queries per hop): {runs[0].path} vs {r.path}")
        th = mh.get("train_hops")
        if th and sorted(int(h) for h in th) != list(range(1, train_hops + 1)):
            raise CompareError(f"{r.path} was trained on hops {th}, not 1..{train_hops} (--train-hops)")
    if not any(1 <= int(h) <= train_hops for h in ref["count"]):
        raise CompareError(f"{runs[0].path}: no test queries with 1..{train_hops} hops")


def _row(runs: Sequence[Run], key: str, label: str, hops: list[str], train_hops: int) -> dict[str, Any]:
    accs = [_mh(r)["accuracy"][key] for r in runs]
    ind = [statistics.fmean(acc[h] for h in hops if 1 <= int(h) <= train_hops) for acc in accs]
    unseen = [h for h in hops if int(h) > train_hops]
    return {"key": key, "label": label, "in_distribution": _stats(ind),
            "unseen": {h: statistics.fmean(acc[h] for acc in accs) for h in unseen},
            "unseen_per_seed": [{h: acc[h] for h in unseen} for acc in accs],
            "curve": {h: _stats([acc[h] for acc in accs]) for h in hops}}


def multihop_summary(arms: dict[str, Sequence[Run]], train_hops: int) -> dict[str, Any]:
    """Per arm: rows at the per-query key (``hops...``), the best fixed T (seed mean of the
    in-distribution accuracy) and ``default``; ``in_distribution`` / ``unseen`` repeat the
    primary row (per-query, else default, else best fixed) for scripts."""
    hops = sorted(_mh(next(iter(arms.values()))[0])["count"], key=int)
    out: dict[str, Any] = {"train_hops": train_hops, "hops": hops,
                           "unseen_hops": [h for h in hops if int(h) > train_hops]}
    for key, runs in arms.items():
        keys = [k for k in _mh(runs[0])["accuracy"] if all(k in _mh(r)["accuracy"] for r in runs)]
        rows = [_row(runs, k, f"per-query T = {k}", hops, train_hops) for k in keys if k.startswith("hops")]
        fixed = sorted((k for k in keys if k.isdigit()), key=int)
        best = None
        if fixed:  # max() keeps the smallest T among ties
            best = max((_row(runs, k, f"best fixed T = {k}", hops, train_hops) for k in fixed),
                       key=lambda r: r["in_distribution"]["mean"])
            rows.append(best)
        rows += [_row(runs, k, k, hops, train_hops) for k in keys if not k.startswith("hops") and not k.isdigit()]
        if not rows:
            raise CompareError(f"{runs[0].path}: no accuracy keys shared by all runs of its arm")
        curves = {k: _row(runs, k, k, hops, train_hops)["curve"] for k in keys}
        prim = rows[0]
        out[key] = {"name": runs[0].name, "kind": runs[0].kind, "runs": [str(r.path) for r in runs],
                    "seeds": [_seed(r) or r.path.name for r in runs], "per_query_key": next((k for k in keys if
                    k.startswith("hops")), None), "best_fixed_key": best["key"] if best else None,
                    "in_distribution": {"key": prim["key"], **prim["in_distribution"]},
                    "unseen": prim["unseen"], "unseen_per_seed": prim["unseen_per_seed"], "rows": rows,
                    "curves": {k: {h: s["mean"] for h, s in c.items()} for k, c in curves.items()}}
    out["chance"] = _mh(arms["a"][0]).get("chance")
    floor = _mh(arms["a"][0]).get("floor")  # single-relation tasks: the best fixed trained depth
    out["floor"] = {h: floor[h] for h in hops if h in floor} if floor else None
    return out


def _arms_table(lm: dict[str, Any]) -> list[str]:
    out = ["| arm | model | params | params a/b | tokens (plan) | tokens trained | model FLOPs (plan) | "
           "hardware FLOPs (plan) | model FLOPs trained | final val loss (mean ± half-range) | per seed |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for key in ARMS:
        s, v = lm[key], lm[key]["final_val_loss"]
        trained = lm[key]["model_flops_trained"]
        out.append(
            f"| {key} | {s['name']} ({s['kind']}) | {fmt_cell(s['params'], ',.0f')} | "
            f"{fmt_cell(lm['params_ratio_a_over_b'], '.3f') if key == 'a' else ''} | "
            f"{fmt_cell(s['tokens_plan'], ',.0f')} | "
            f"{fmt_cell(statistics.fmean(s['tokens_trained']) if all(s['tokens_trained']) else None, ',.0f')} | "
            f"{fmt_cell(s['model_flops_plan'], '.3e')} | {fmt_cell(s['hardware_flops_plan'], '.3e')} | "
            f"{fmt_cell(statistics.fmean(trained) if all(trained) else None, '.3e')} | "
            f"{v['mean']:.4f} ± {v['half_range']:.4f} | "
            + ", ".join(f"{sd}: {x:.4f}" for sd, x in zip(s["seeds"], v["per_seed"])) + " |")
    return out


def _gap_sentence(lm: dict[str, Any]) -> str:
    a, b = lm["a"], lm["b"]
    head = (f"Mean final val loss: {a['name']} {a['final_val_loss']['mean']:.4f}, {b['name']} "
            f"{b['final_val_loss']['mean']:.4f}; gap (a - b) = {lm['gap']:+.4f}.")
    if lm["noise"] is None:
        return f"{head} One seed per arm: seed noise was not measured."
    return (f"{head} Seed noise (the larger within-arm max - min over {len(a['seeds'])} seeds) = "
            f"{lm['noise']:.4f}; |gap| {'exceeds' if lm['gap_exceeds_noise'] else 'does not exceed'} it.")


def _mh_table(mh: dict[str, Any]) -> list[str]:
    unseen = mh["unseen_hops"]
    out = [f"| arm | model | T | seed | in-dist. EM (hops 1..{mh['train_hops']}) | "
           + " | ".join(f"{h} hops" for h in unseen) + " |", "|---|---|---|---|---:|" + "---:|" * len(unseen)]
    if mh.get("floor"):
        cells = " | ".join(fmt_cell(mh["floor"].get(h), ".3f") for h in unseen)
        out.append(f"| - | shortcut floor | best fixed trained depth | - | 1.000 | {cells} |")
    for key in ARMS:
        arm = mh[key]
        for row in arm["rows"]:
            ind, head = row["in_distribution"], f"| {key} | {arm['name']} | {row['label']} |"
            for i, seed in enumerate(arm["seeds"]):
                cells = " | ".join(fmt_cell(row["unseen_per_seed"][i][h], ".3f") for h in unseen)
                out.append(f"{head} {seed} | {ind['per_seed'][i]:.3f} | {cells} |")
            cells = " | ".join(fmt_cell(row["unseen"][h], ".3f") for h in unseen)
            out.append(f"{head} **mean** | **{ind['mean']:.3f}** (± {ind['half_range']:.3f}) | {cells} |")
    return out


def write_report(out: Path, lm: dict[str, Any], mh: dict[str, Any] | None, plan: dict[str, Any] | None,
                 data_lines: list[str], loops_png: bool) -> Path:
    """``out/report.md`` from the summaries (the PNGs are already written)."""
    n = len(lm["a"]["seeds"])
    lines = [f"# {lm['a']['name']} vs {lm['b']['name']}: {n} seed(s) per arm, identical data", "",
             *(f"- {what} runs, arm {k}: " + ", ".join(f"`{p}`" for p in d[k]["runs"])
               for what, d in (("LM", lm), ("Multi-hop", mh)) if d for k in ARMS)]
    if plan:
        lines.append(f"- Plan: matching `{plan.get('match')}`: {plan.get('description', '')}")
    src = "mythos.eval, whole val split" if lm["val_loss_source"] == "eval" else "the trainer's last periodic eval"
    lines += ["- Data checks (mythos.compare.data_check), all passed:", *(f"  - {ln}" for ln in data_lines), "",
              "## Arms", "", *_arms_table(lm), "",
              f"(plan) columns: {'from the plan' if plan else 'no plan given'}; params from "
              f"{'the plan' if plan else 'run_info.json'}. Final val loss: {src}; spreads are min..max over seeds.", ""]
    lines += [f"Note: run_info.json of arm {k} reports {lm[k]['params_run']:,} params, the plan {lm[k]['params']:,}."
              "\n" for k in ARMS if plan and lm[k]["params_run"] not in (None, lm[k]["params"])]
    lines += [_gap_sentence(lm), "", "## Loss curves", "", "![loss vs tokens](loss_vs_tokens.png)", "",
              "![loss vs FLOPs](loss_vs_flops.png)", ""]
    if loops_png:
        by = lm["a"]["loss_by_loops"]
        lines += ["## Val loss vs test-time loop count", "", "![loss vs loops](loss_vs_loops.png)", "",
                  f"- {lm['a']['name']} (seed mean): " + ", ".join(f"T={t}: {by[t]['mean']:.4f}" for t in
                                                              sorted(by, key=int)), ""]
    if mh:
        lines += ["## Multi-hop task", "", f"Trained on hops 1..{mh['train_hops']}; exact-match accuracy on "
                  "held-out test queries. Best fixed T is chosen by the seed-mean in-distribution accuracy "
                  f"on these same test queries. Chance (uniform guess): {fmt_cell(mh['chance'], '.4f')}."
                  + (" Shortcut floor: the best accuracy of answering every query of a hop count with "
                     f"pi^j(start) for one trained depth j <= {mh['train_hops']} (what a model that runs a fixed "
                     "trained depth gets for free); depth extrapolation means accuracy above it."
                     if mh.get("floor") else ""), "",
                  *_mh_table(mh), "", "![multi-hop accuracy](multihop_accuracy.png)", ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def console_lines(lm: dict[str, Any], mh: dict[str, Any] | None) -> list[str]:
    """The 3-5 line summary ``main`` prints."""
    a, b = lm["a"], lm["b"]
    lines = [f"final val loss ({lm['val_loss_source']}, {len(a['seeds'])} seed(s)): {a['name']} "
             f"{a['final_val_loss']['mean']:.4f} ± {a['final_val_loss']['half_range']:.4f} | {b['name']} "
             f"{b['final_val_loss']['mean']:.4f} ± {b['final_val_loss']['half_range']:.4f}",
             f"gap (a - b) {lm['gap']:+.4f}, seed noise {fmt_cell(lm['noise'])}, gap exceeds noise: "
             f"{lm['gap_exceeds_noise']}; params a/b {fmt_cell(lm['params_ratio_a_over_b'], '.3f')}"]
    if mh:
        ind = " | ".join(f"{mh[k]['name']} T={mh[k]['in_distribution']['key']} "
                         f"{mh[k]['in_distribution']['mean']:.3f}" for k in ARMS)
        lines.append(f"multihop in-distribution EM (hops 1..{mh['train_hops']}): {ind}")
        lines.append("unseen hops " + ",".join(mh["unseen_hops"]) + ": " + " | ".join(
            f"{mh[k]['name']} " + " ".join(f"{v:.2f}" for v in mh[k]["unseen"].values()) for k in ARMS))
    return lines


def build_parser() -> ArgumentParser:
    """The ``python -m mythos.experiment_report`` argument parser."""
    ap = ArgumentParser(prog="python -m mythos.experiment_report", description=__doc__)
    ap.add_argument("--out", required=True, metavar="DIR", help="report directory")
    ap.add_argument("--lm-a", nargs="+", required=True, metavar="RUN", help="arm a (RDT) LM runs, one per seed")
    ap.add_argument("--lm-b", nargs="+", required=True, metavar="RUN", help="arm b (dense) LM runs, same seeds")
    ap.add_argument("--mh-a", nargs="+", default=None, metavar="RUN", help="arm a multi-hop runs, one per seed")
    ap.add_argument("--mh-b", nargs="+", default=None, metavar="RUN", help="arm b multi-hop runs, same seeds")
    ap.add_argument("--plan", default=None, metavar="PLAN_JSON", help="plan.json of the LM pair (mythos.plan)")
    ap.add_argument("--train-hops", type=int, default=5, metavar="N", help="multi-hop runs trained on hops 1..N")
    return ap


def _load_plan(path: str, runs: dict[str, list[Run]]) -> dict[str, Any]:
    """``--plan``'s plan.json; refused unless its two arms have the kinds of the LM arms' runs."""
    try:
        plan = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CompareError(f"--plan {path}: not a readable plan.json ({exc})") from None
    if not isinstance(plan, dict) or len(plan.get("arms") or []) != 2:
        raise CompareError(f"--plan {path}: expected the two arms of a python -m mythos.plan plan.json")
    for key, arm in zip(ARMS, plan["arms"]):
        if arm.get("kind") != runs[key][0].kind:
            raise CompareError(f"--plan {path}: plan arm {key} is {arm.get('name')} ({arm.get('kind')}) but "
                               f"{runs[key][0].path} is {runs[key][0].kind}: the plan is not of these runs")
    return plan


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; 0 on success, 2 on bad input (one ``error:`` line). summary.json is
    ``{"lm": lm_summary(...), "multihop": multihop_summary(...) | None, "plan": {match, ...} | None}``."""
    a = build_parser().parse_args(argv)
    if (a.mh_a is None) != (a.mh_b is None):
        return fail("give both --mh-a and --mh-b, or neither")
    if a.train_hops < 1:
        return fail(f"--train-hops must be >= 1, got {a.train_hops}")
    out = Path(a.out)
    try:
        lm_runs = {"a": [load_run(p) for p in a.lm_a], "b": [load_run(p) for p in a.lm_b]}
        plan = _load_plan(a.plan, lm_runs) if a.plan else None
        data_lines = check_arms(lm_runs["a"], lm_runs["b"], "LM runs")
        mh_runs = None
        if a.mh_a:
            mh_runs = {"a": [load_run(p) for p in a.mh_a], "b": [load_run(p) for p in a.mh_b]}
            data_lines += check_arms(mh_runs["a"], mh_runs["b"], "multihop runs")
            check_test_sets([*mh_runs["a"], *mh_runs["b"]], a.train_hops)
        lm = lm_summary(lm_runs["a"], lm_runs["b"], plan)
        mh = multihop_summary(mh_runs, a.train_hops) if mh_runs else None
    except (CompareError, KeyError, ValueError) as exc:
        return fail(exc if isinstance(exc, CompareError) else f"malformed input: {type(exc).__name__}: {exc}")
    out.mkdir(parents=True, exist_ok=True)
    plot_loss(lm_runs, "train/tokens", "tokens", out / "loss_vs_tokens.png")
    plot_loss(lm_runs, "train/flops", "training FLOPs (model)", out / "loss_vs_flops.png")
    loops_png = plot_loops(lm, out / "loss_vs_loops.png")
    if mh:
        plot_multihop(mh, out / "multihop_accuracy.png")
    plan_keys = ("match", "description", "model_flops_ratio_a_over_b")
    summary = {"lm": lm, "multihop": mh, "plan": {k: plan.get(k) for k in plan_keys} if plan else None}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    report = write_report(out, lm, mh, plan, data_lines, loops_png)
    print("\n".join(console_lines(lm, mh)))
    print(f"wrote {report} and {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
