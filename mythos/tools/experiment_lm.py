"""The language-modelling half of the experiment report: is the analogue a scale model of the
cluster pair, and how do RDT and dense compare at matched compute and matched tokens, per size?

Pure functions of runs and plans (``mythos.tools.runs.Run``, ``mythos.tools.plan`` plan.json), used by
:mod:`mythos.tools.experiment_report`, which writes the markdown and the plots.

- :func:`ratio_table`: :func:`mythos.accounting.pair_ratios` of the cluster pair and of every
  analogue pair, each analogue row flagged when more than 10% off the cluster's (head shares:
  above :data:`mythos.accounting.HEAD_SHARE_MAX`).
- :func:`comparison`: one RDT arm against one dense arm under one plan (a size x a matching):
  seed statistics, the gap of the means with a 95% Welch interval, the seed noise, and a verdict
  (inside the noise / unresolved / an arm ahead).
- :func:`loop_use`: the RDT's val loss at T = 1, E[T], 2E[T], 4E[T]: does it use its loop, and do
  more loops hurt?
- :func:`trend`: the matched-compute and matched-tokens gaps per size, ordered by compute.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from mythos.accounting import PAIR_RATIO_ROWS, PAIR_SHARE_ROWS, pair_ratios, ratio_flags
from mythos.config import ConfigError, from_dict, load_yaml
from mythos.model.build import load_model_config
from mythos.model.config import ModelConfig
from mythos.run_dir import RESOLVED_CONFIG
from mythos.tools.runs import CompareError, Run, data_check

ARMS = ("a", "b")
#: The pair the analogue stands in for, at its training context.
CLUSTER_PAIR = ("rdt-770m", "dense-1.3b", 2048)
RATIO_TOLERANCE = 0.10
#: Loss differences (nats) below this are "no difference" when seed noise is not measurable.
MIN_EFFECT = 0.005
#: Two-sided 95% Student-t quantiles for df = 1..30 (beyond: the normal 1.96).
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042)


def seed_of(run: Run) -> str | None:
    """``"seed N"`` from ``train.seed`` in the run's ``config.resolved.yaml``; None when not readable."""
    try:
        seed = (load_yaml(run.path / RESOLVED_CONFIG).get("train") or {}).get("seed")
    except ConfigError:
        return None
    return f"seed {seed}" if seed is not None else None


def stats(xs: Sequence[float]) -> dict[str, Any]:
    """Mean, min, max, half-range (``(max - min) / 2``) and the per-seed values."""
    return {"mean": statistics.fmean(xs), "min": min(xs), "max": max(xs), "half_range": (max(xs) - min(xs)) / 2,
            "per_seed": list(xs)}


def t95(df: float) -> float:
    """Two-sided 95% Student-t quantile; non-integer ``df`` rounds down (conservative)."""
    k = max(1, int(math.floor(df)))
    return _T95[k - 1] if k <= len(_T95) else 1.96


def welch_interval(a: Sequence[float], b: Sequence[float]) -> tuple[float, float] | None:
    """95% interval of ``mean(a) - mean(b)`` (Welch: unequal variances, Satterthwaite df); None
    with fewer than two values in an arm. Equal values in both arms give a zero-width interval."""
    if len(a) < 2 or len(b) < 2:
        return None
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    gap = statistics.fmean(a) - statistics.fmean(b)
    se = math.sqrt(va + vb)
    if se == 0.0:
        return gap, gap
    df = (va + vb) ** 2 / ((va**2 / (len(a) - 1) if va else 0.0) + (vb**2 / (len(b) - 1) if vb else 0.0))
    half = t95(df) * se
    return gap - half, gap + half


def check_arms(a: Sequence[Run], b: Sequence[Run], what: str) -> list[str]:
    """Raise :class:`CompareError` unless the arms are one model each, seed-paired and trained on
    identical data; returns the data-check lines (one per pair checked)."""
    if len(a) != len(b):
        raise CompareError(f"{what}: {len(a)} runs in arm a but {len(b)} in arm b (one run per seed in each)")
    paths = [r.path.resolve() for r in (*a, *b)]
    if len(set(paths)) < len(paths):
        twice = next(p for p in paths if paths.count(p) > 1)
        raise CompareError(f"{what}: {twice} is given twice (a run compared with itself has no gap to report)")
    for arm in (a, b):
        if len(models := {(r.kind, r.name) for r in arm}) > 1:
            raise CompareError(f"{what}: one arm mixes models {sorted(models)} ({', '.join(str(r.path) for r in arm)})")
    lines = []
    pairs = [(x, y, True) for x, y in zip(a, b)] + [(arm[0], r, False) for arm in (a, b) for r in arm[1:]]
    for x, y, same_seed in pairs:
        sx, sy = seed_of(x), seed_of(y)
        if same_seed and sx is not None and sy is not None and sx != sy:
            raise CompareError(f"{what}: {x.path} ({sx}) is paired with {y.path} ({sy}): give the same seed order")
        ok, line = data_check(x, y)
        if not ok:
            raise CompareError(f"{what}: {x.path} vs {y.path}: {line}; refusing")
        lines.append(f"{x.path.name} vs {y.path.name}: {line}")
    return lines


# ---------------------------------------------------------------------------------------------
# is the analogue a scale model?


def run_model_config(run: Run) -> ModelConfig:
    """The model config a run trained (its ``config.resolved.yaml``)."""
    path = run.path / RESOLVED_CONFIG
    try:
        return from_dict(ModelConfig, load_yaml(path).get("model") or {}, source=path)
    except ConfigError as exc:
        raise CompareError(f"{path}: no readable model config ({exc})") from None


def ratio_table(pairs: Sequence[tuple[ModelConfig, ModelConfig, int]]) -> dict[str, Any]:
    """``{"reference": {name, ratios}, "analogues": [{name, ratios, flags}], "rows", "share_rows",
    "tolerance"}`` for ``(rdt, dense, seq_len)`` analogue pairs against :data:`CLUSTER_PAIR`."""
    def one(rdt: ModelConfig, dense: ModelConfig, seq_len: int) -> dict[str, Any]:
        return {"name": f"{rdt.name} / {dense.name} @ seq {seq_len}", "models": [rdt.name, dense.name],
                "ratios": pair_ratios(rdt, dense, seq_len)}

    rdt, dense, seq = CLUSTER_PAIR
    ref = one(load_model_config(rdt), load_model_config(dense), seq)
    analogues = [one(*p) for p in pairs]
    for an in analogues:
        an["flags"] = ratio_flags(an["ratios"], ref["ratios"], RATIO_TOLERANCE)
    return {"reference": ref, "analogues": analogues, "rows": dict(PAIR_RATIO_ROWS),
            "share_rows": dict(PAIR_SHARE_ROWS), "tolerance": RATIO_TOLERANCE}


# ---------------------------------------------------------------------------------------------
# one comparison: a size x a matching


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


def _check_plan(runs: Sequence[Run], arm: dict[str, Any], key: str) -> None:
    """Refuse a run that trained on other tokens than its plan arm says (a stale or foreign plan)."""
    for r in runs:
        got = r.train[-1].get("train/tokens") if r.train else None
        if got is not None and arm.get("tokens") and int(got) != int(arm["tokens"]):
            raise CompareError(f"{r.path} trained on {int(got):,} tokens but its plan's arm {key} ({arm.get('name')}) "
                               f"says {int(arm['tokens']):,}: not the run of this plan")


def comparison(a: Sequence[Run], b: Sequence[Run], plan: dict[str, Any] | None) -> dict[str, Any]:
    """One RDT (a) vs dense (b) comparison: per arm the runs, seeds, params/tokens/FLOPs and final
    val loss statistics; ``gap`` = mean(a) - mean(b) with its 95% Welch ``interval``; ``noise`` =
    the larger within-arm max - min (None with one seed); ``verdict``: ``inside noise`` (|gap| <=
    noise), ``unresolved`` (|gap| > noise but the interval holds 0: too few seeds to call it),
    ``a ahead`` / ``b ahead`` (the interval excludes 0), ``one seed`` (no noise measured)."""
    losses, source = final_val_losses([*a, *b])
    out: dict[str, Any] = {"val_loss_source": source, "match": plan.get("match") if plan else None,
                           "description": plan.get("description") if plan else None}
    for i, (key, runs) in enumerate(zip(ARMS, (a, b))):
        pl = plan["arms"][i] if plan else {}
        if plan:
            _check_plan(runs, pl, key)
        vals = losses[:len(a)] if key == "a" else losses[len(a):]
        curves = [loop_curve(r, source) for r in runs]
        common = sorted(set.intersection(*(set(c) for c in curves))) if all(curves) else []
        params = pl.get("params", runs[0].info.get("params"))
        tokens = [r.train[-1].get("train/tokens") for r in runs]
        out[key] = {
            "name": runs[0].name, "kind": runs[0].kind, "runs": [str(r.path) for r in runs],
            "seeds": [seed_of(r) or r.path.name for r in runs], "params_run": runs[0].info.get("params"),
            "params": params, "tokens_plan": pl.get("tokens"), "tokens_trained": tokens,
            "tokens_per_param": (statistics.fmean(tokens) / params) if params and all(tokens) else None,
            "loops_expected": pl.get("loops_expected"),
            "model_flops_plan": pl.get("model_flops"), "hardware_flops_plan": pl.get("hardware_flops"),
            "model_flops_trained": [r.train[-1].get("train/flops") for r in runs],
            "final_val_loss": stats(vals), "loss_by_loops": {str(t): stats([c[t] for c in curves]) for t in common}}
    pa, pb = out["a"]["params"], out["b"]["params"]
    out["params_ratio_a_over_b"] = pa / pb if pa and pb else None
    fa, fb = (statistics.fmean(out[k]["model_flops_trained"]) if all(out[k]["model_flops_trained"]) else None
              for k in ARMS)
    out["flops_ratio_a_over_b"] = fa / fb if fa and fb else None
    va, vb = out["a"]["final_val_loss"]["per_seed"], out["b"]["final_val_loss"]["per_seed"]
    out["gap"] = out["a"]["final_val_loss"]["mean"] - out["b"]["final_val_loss"]["mean"]
    out["interval"] = welch_interval(va, vb)
    spread = [out[k]["final_val_loss"]["max"] - out[k]["final_val_loss"]["min"] for k in ARMS]
    out["noise"] = max(spread) if len(a) > 1 and len(b) > 1 else None
    out["gap_exceeds_noise"] = abs(out["gap"]) > out["noise"] if out["noise"] is not None else None
    if out["noise"] is None:
        out["verdict"] = "one seed"
    elif not out["gap_exceeds_noise"]:
        out["verdict"] = "inside noise"
    elif out["interval"] and out["interval"][0] <= 0 <= out["interval"][1]:
        out["verdict"] = "unresolved"  # beyond the seed spread, but too few seeds to exclude 0
    else:
        out["verdict"] = "a ahead" if out["gap"] < 0 else "b ahead"
    return out


def loop_use(c: dict[str, Any]) -> dict[str, Any] | None:
    """The loop-use check of a comparison's RDT arm (None without loss-by-loops or without the
    plan's E[T]): val loss at T = 1, E[T], 2E[T], 4E[T] (E[T] rounded), ``gain`` =
    loss(1) - loss(E[T]) (> 0: the loop is used), ``extra_2x`` / ``extra_4x`` = loss(kE[T]) -
    loss(E[T]) (> 0: more loops hurt). ``threshold`` = max(the RDT's seed spread at E[T],
    :data:`MIN_EFFECT`): effects at or below it are reported as none."""
    by = c["a"]["loss_by_loops"]
    et = c["a"].get("loops_expected")
    if not by or not et:
        return None
    t = round(et)
    want = {"1": "1", "E": str(t), "2E": str(2 * t), "4E": str(4 * t)}
    missing = [v for v in want.values() if v not in by]
    if missing:
        raise CompareError(f"loop-use check of {c['a']['name']}: no val loss at T={','.join(missing)} "
                           f"(evaluate the RDT runs with --loops 1,{t},{2 * t},{4 * t})")
    loss = {k: by[v]["mean"] for k, v in want.items()}
    thr = max(by[want["E"]]["max"] - by[want["E"]]["min"], MIN_EFFECT)
    gain, x2, x4 = loss["1"] - loss["E"], loss["2E"] - loss["E"], loss["4E"] - loss["E"]
    return {"T": {k: int(v) for k, v in want.items()}, "loss": loss, "gain": gain, "extra_2x": x2, "extra_4x": x4,
            "threshold": thr, "loop_used": gain > thr, "more_loops_hurt": max(x2, x4) > thr}


def trend(comparisons: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per RDT model (size), ordered by its training compute: the gap, interval and verdict of its
    ``compute`` and ``tokens`` comparisons (None where absent)."""
    by: dict[str, dict[str, Any]] = {}
    for c in comparisons:
        row = by.setdefault(c["a"]["name"], {"rdt": c["a"]["name"], "dense": c["b"]["name"],
                                             "params_a": c["a"]["params"], "params_b": c["b"]["params"],
                                             "rdt_flops": statistics.fmean(c["a"]["model_flops_trained"])
                                             if all(c["a"]["model_flops_trained"]) else None})
        if c["match"] in ("compute", "tokens"):
            row[c["match"]] = {k: c[k] for k in ("gap", "interval", "noise", "verdict")}
    return sorted(by.values(), key=lambda r: r["rdt_flops"] or 0.0)
