"""Plan a matched comparison of two runs: token budgets, FLOPs, steps and GPU-hours.

    mythos-plan --a configs/run/rdt-770m.yaml --b configs/run/dense-1.3b.yaml \\
        --match compute [--flops 3e20] [--gpus 8 --peak-tflops 989.5 --mfu 0.4] [--out plans/compute]

``mythos-plan`` is the installed command; ``python -m mythos.tools.plan`` and, in a checkout,
``python launch/plan.py`` run the same :func:`main`.

Matching protocols (``--match``), each stated in every output:

- ``tokens``: both runs train on the same number of tokens (``--tokens``; default run A's
  ``train.max_tokens``). Same data *and* same amount of it; the RDT spends more FLOPs per token.
- ``compute``: both runs spend the same total training **model FLOPs** (``--flops``; default run
  A's FLOPs at its configured tokens). Token budgets are ``F / flops_per_token``, rounded to whole
  optimizer steps; the realised totals are checked equal within 1%.
- ``tokens-per-param``: ``R`` tokens per parameter (``--ratio``, default 80: Parcae's protocol,
  61.6B tokens for the 770M and 104B for the 1.3B from the same corpus). ``--params-basis
  nominal`` (the default when both model names carry a size such as ``770m`` / ``1.3b``) uses the
  nominal sizes as Parcae did; ``exact`` uses the exact parameter counts.

FLOPs per token come from :mod:`mythos.accounting` (structural matmul count + attention scores).
Two numbers per run, and the choice is explicit:

- **model FLOPs** (used for matching and MFU; docs/design.md, "FLOPs accounting"): the RDT at
  its *expected* loop count ``E[T]`` forward and ``E[min(T, bwd_depth)]`` backward;
- **executed (hardware) FLOPs**: the core iterations the RDT actually runs per sequence
  (:func:`mythos.accounting.executed_loops`: ``E[T]`` with ``loops.execution=active``, the
  default, which computes only the sequences still looping; the *global-batch maximum* T with
  ``masked``), plus the activation-checkpoint recompute (HFU). This is what the accelerator
  actually does, so the GPU-hour estimate is given for both.

Outputs in ``--out``: ``<name>.yaml`` for both runs (loadable by ``load_run_config``, with
``train.max_tokens`` set and ``train.max_steps: 0``) and ``plan.json``; the table is printed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mythos.accounting import arm_costs
from mythos.cli_common import ArgumentParser, fail, prepare_out_dir
from mythos.config import ConfigError, dump_yaml, to_dict
from mythos.io import atomic_write_text
from mythos.train.config import RunConfig, load_run_config

MATCHES = ("tokens", "compute", "tokens-per-param")
#: |F_a / F_b - 1| allowed after rounding token budgets to whole steps under ``--match compute``.
COMPUTE_TOLERANCE = 0.01
_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)([mb])\b", re.IGNORECASE)


@dataclass(frozen=True)
class ArmPlan:
    """One run of the plan. FLOPs are per token (``*_per_token``) or totals over the budget."""

    name: str
    config: str
    kind: str
    params: int
    params_non_embedding: int
    params_basis: float
    """Parameter count used by ``tokens-per-param`` (exact or nominal)."""
    seq_len: int
    tokens_per_step: int
    loops_expected: float | None
    loops_executed: float | None
    model_flops_per_token: float
    executed_flops_per_token: float
    hardware_flops_per_token: float
    tokens: int
    steps: int
    model_flops: float
    executed_flops: float
    hardware_flops: float
    gpu_hours: float
    """Model FLOPs / (peak * MFU): the budget at the stated MFU."""
    gpu_hours_executed: float
    """Hardware FLOPs / (peak * MFU): if the device sustains that utilisation on executed work."""
    wall_hours: float


def nominal_params(name: str) -> float | None:
    """``rdt-770m`` -> 7.7e8, ``dense-1.3b`` -> 1.3e9; None when the name carries no size."""
    m = _SIZE_RE.search(name)
    if not m:
        return None
    return float(m.group(1)) * (1e6 if m.group(2).lower() == "m" else 1e9)


def seq_len_of(cfg: RunConfig, override: int) -> int:
    """``--seq-len``, else the shards' ``seq_len`` when the manifest is readable, else ``model.max_seq_len``."""
    if override:
        return override
    try:
        from mythos.data.format import load_manifest

        return load_manifest(cfg.data.shards).seq_len
    except ConfigError:
        return cfg.model.max_seq_len


def plan(
    cfg_a: RunConfig,
    cfg_b: RunConfig,
    match: str,
    *,
    tokens: float = 0,
    flops: float = 0,
    ratio: float = 80.0,
    params_basis: str = "auto",
    gpus: int = 8,
    peak_tflops: float = 989.5,
    mfu: float = 0.4,
    seq_len: int = 0,
    paths: tuple[str, str] = ("a", "b"),
) -> dict[str, Any]:
    """The plan as a JSON-able dict: ``{"match", "description", "arms": [ArmPlan, ArmPlan], ...}``."""
    if match not in MATCHES:
        raise ConfigError(f"--match must be one of {', '.join(MATCHES)}, got '{match}'")
    if gpus < 1 or peak_tflops <= 0 or not 0 < mfu <= 1:
        raise ConfigError("--gpus must be >= 1, --peak-tflops > 0 and --mfu in (0, 1]")
    cfgs = (cfg_a, cfg_b)
    lens = [seq_len_of(c, seq_len) for c in cfgs]
    costs = [arm_costs(c, s) for c, s in zip(cfgs, lens)]
    tps = [c.train.global_batch_size * s for c, s in zip(cfgs, lens)]
    notes: list[str] = []

    basis = params_basis
    nominal = [nominal_params(c.model.name or c.name) for c in cfgs]
    if basis == "auto":
        basis = "nominal" if match == "tokens-per-param" and all(nominal) else "exact"
    if basis == "nominal" and not all(nominal):
        raise ConfigError("--params-basis nominal needs a size in both model names (e.g. rdt-770m, dense-1.3b)")
    pbasis = [float(n) if basis == "nominal" else float(c.params) for n, c in zip(nominal, costs)]

    if match == "tokens":
        budget = tokens or cfg_a.train.max_tokens or cfg_a.train.max_steps * tps[0]
        if budget <= 0:
            raise ConfigError(f"{paths[0]}: set train.max_tokens or pass --tokens")
        want = [budget, budget]
        desc = f"same tokens: {budget:.4g} tokens for both runs (same data, same order)"
    elif match == "compute":
        budget = flops or costs[0].model * (cfg_a.train.max_tokens or cfg_a.train.max_steps * tps[0])
        if budget <= 0:
            raise ConfigError(f"{paths[0]}: set train.max_tokens or pass --flops")
        want = [budget / c.model for c in costs]
        desc = (f"same compute: {budget:.4g} training model FLOPs for both runs (RDT at E[T]); "
                f"token budgets differ")
    else:
        if ratio <= 0:
            raise ConfigError(f"--ratio must be > 0, got {ratio}")
        want = [ratio * p for p in pbasis]
        desc = (f"tokens per parameter: {ratio:g} x {basis} parameters each (Parcae's protocol; "
                f"same corpus, different amounts)")

    steps = [max(1, math.ceil(w / t)) for w, t in zip(want, tps)]
    realised = [s * t for s, t in zip(steps, tps)]
    arms = []
    for cfg, path, c, s_len, tp, st, tok, pb in zip(cfgs, paths, costs, lens, tps, steps, realised, pbasis):
        model_f, exe_f, hw_f = c.model * tok, c.executed * tok, c.hardware * tok
        gpu_h = model_f / (peak_tflops * 1e12 * mfu) / 3600
        arms.append(ArmPlan(
            name=cfg.name, config=path, kind=cfg.model.kind, params=c.params, params_non_embedding=c.non_embedding,
            params_basis=pb, seq_len=s_len, tokens_per_step=tp, loops_expected=c.loops_expected,
            loops_executed=c.loops_executed, model_flops_per_token=c.model, executed_flops_per_token=c.executed,
            hardware_flops_per_token=c.hardware, tokens=tok, steps=st, model_flops=model_f, executed_flops=exe_f,
            hardware_flops=hw_f, gpu_hours=gpu_h, gpu_hours_executed=hw_f / (peak_tflops * 1e12 * mfu) / 3600,
            wall_hours=gpu_h / gpus,
        ))
    ratio_f = arms[0].model_flops / arms[1].model_flops
    if match == "compute" and abs(ratio_f - 1) > COMPUTE_TOLERANCE:
        raise ConfigError(
            f"matched compute is off by {100 * abs(ratio_f - 1):.2f}% after rounding to whole steps "
            f"({steps[0]} vs {steps[1]} steps); raise --flops or lower train.global_batch_size"
        )
    if to_dict(cfg_a.data) != to_dict(cfg_b.data):
        notes.append("WARNING: the two configs have different data sections; this is not an identical-data comparison")
    if cfg_a.train.seed != cfg_b.train.seed or tps[0] != tps[1]:
        notes.append("note: seeds or tokens per step differ between the runs")
    notes.append("model FLOPs (matching, MFU) count the RDT at E[T]; executed/hardware FLOPs count the loops the RDT "
                 "really runs (E[T] with loops.execution=active; the global-batch max T with masked), plus "
                 "activation-checkpoint recompute")
    return {
        "match": match,
        "description": desc,
        "params_basis": basis,
        "arms": [dataclasses.asdict(a) for a in arms],
        "model_flops_ratio_a_over_b": ratio_f,
        "hardware": {"gpus": gpus, "peak_tflops": peak_tflops, "mfu": mfu},
        "notes": notes,
    }


def format_table(p: dict[str, Any]) -> str:
    a, b = p["arms"]
    w = max(18, len(a["name"]) + 2, len(b["name"]) + 2)  # long run names stay apart

    def row(label: str, fmt: str, key: str) -> str:
        vals = [(fmt.format(x[key]) if x[key] is not None else "-") for x in (a, b)]
        return f"  {label:<34}{vals[0]:>{w}}{vals[1]:>{w}}"

    lines = [f"matching: {p['match']} -- {p['description']}", f"  {'':<34}{a['name']:>{w}}{b['name']:>{w}}"]
    lines += [
        row("kind", "{}", "kind"),
        row("params (M)", "{:.4g}", "params"),
        row("params used for tokens/param (M)", "{:.4g}", "params_basis"),
        row("E[T], expected loops (RDT)", "{:.2f}", "loops_expected"),
        row("executed T per sequence (RDT)", "{:.2f}", "loops_executed"),
        row("model GFLOP/token (matching, MFU)", "{:.4g}", "model_flops_per_token"),
        row("executed GFLOP/token (active rows)", "{:.4g}", "executed_flops_per_token"),
        row("hardware GFLOP/token (+recompute)", "{:.4g}", "hardware_flops_per_token"),
        row("tokens (B)", "{:.4g}", "tokens"),
        row("steps", "{}", "steps"),
        row("total model FLOPs", "{:.3e}", "model_flops"),
        row("total hardware FLOPs", "{:.3e}", "hardware_flops"),
        row("GPU-hours (model FLOPs @ MFU)", "{:.4g}", "gpu_hours"),
        row("GPU-hours (hardware FLOPs @ MFU)", "{:.4g}", "gpu_hours_executed"),
        row("wall hours on the given GPUs", "{:.4g}", "wall_hours"),
    ]
    out = list(lines)
    h = p["hardware"]
    out.append(f"  assumptions: {h['gpus']} GPUs x {h['peak_tflops']} TFLOP/s peak at MFU {h['mfu']}; "
               f"model FLOPs ratio a/b = {p['model_flops_ratio_a_over_b']:.4f}")
    out += [f"  {n}" for n in p["notes"]]
    return "\n".join(out)


def _display(p: dict[str, Any]) -> dict[str, Any]:
    """Copy of the plan with units scaled for the table (M params, GFLOP, B tokens)."""
    q = json.loads(json.dumps(p))
    for arm in q["arms"]:
        arm["params"] /= 1e6
        arm["params_basis"] /= 1e6
        arm["tokens"] /= 1e9
        for k in ("model_flops_per_token", "executed_flops_per_token", "hardware_flops_per_token"):
            arm[k] /= 1e9
    return q


def write_outputs(p: dict[str, Any], cfgs: Sequence[RunConfig], out: Path) -> list[Path]:
    """``<name>.yaml`` per run (train.max_tokens set, max_steps 0) + ``plan.json``; atomic writes."""
    written = []
    for cfg, arm in zip(cfgs, p["arms"]):
        planned = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_tokens=int(arm["tokens"]),
                                                                     max_steps=0))
        header = (f"# Written by mythos-plan: matching = {p['match']} ({p['description']}).\n"
                  f"# {arm['tokens']:.4g} tokens = {arm['steps']} steps x {arm['tokens_per_step']} tokens; "
                  f"{arm['model_flops']:.4g} model FLOPs ({arm['hardware_flops']:.4g} hardware FLOPs).\n")
        path = out / f"{cfg.name}.yaml"
        atomic_write_text(path, header + dump_yaml(planned))
        written.append(path)
    atomic_write_text(out / "plan.json", json.dumps(p, indent=2) + "\n")
    written.append(out / "plan.json")
    return written


def build_parser() -> ArgumentParser:
    """The ``mythos-plan`` argument parser."""
    ap = ArgumentParser(prog="mythos-plan", description=__doc__)
    ap.add_argument("--a", required=True, metavar="CONFIG", help="run config of arm A (e.g. configs/run/rdt-770m.yaml)")
    ap.add_argument("--b", required=True, metavar="CONFIG",
                    help="run config of arm B (e.g. configs/run/dense-1.3b.yaml)")
    ap.add_argument("--match", required=True, choices=MATCHES, help="matching protocol (see above)")
    ap.add_argument("--tokens", type=float, default=0,
                    help="--match tokens: tokens per run (0 = run A's train.max_tokens)")
    ap.add_argument("--flops", type=float, default=0,
                    help="--match compute: total training model FLOPs per run (0 = run A's at its tokens)")
    ap.add_argument("--ratio", type=float, default=80.0, help="--match tokens-per-param: tokens per parameter")
    ap.add_argument("--params-basis", choices=("auto", "exact", "nominal"), default="auto",
                    help="parameter count for tokens-per-param (auto: nominal when both names carry a size)")
    ap.add_argument("--seq-len", type=int, default=0, help="0 = the shards' seq_len, else model.max_seq_len")
    ap.add_argument("--gpus", type=int, default=8, help="GPUs per run, for the GPU-hour estimate")
    ap.add_argument("--peak-tflops", type=float, default=989.5, help="per-GPU dense bf16 peak (H100 SXM: 989.5)")
    ap.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation")
    ap.add_argument("--out", default=None, metavar="DIR",
                    help="directory for the two run configs and plan.json (default: print the table only)")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    try:
        out = prepare_out_dir(a.out) if a.out else None  # before the work: a bad --out is one line
        cfg_a, cfg_b = load_run_config(a.a), load_run_config(a.b)
        p = plan(cfg_a, cfg_b, a.match, tokens=a.tokens, flops=a.flops, ratio=a.ratio, params_basis=a.params_basis,
                 gpus=a.gpus, peak_tflops=a.peak_tflops, mfu=a.mfu, seq_len=a.seq_len, paths=(a.a, a.b))
    except (ConfigError, FileNotFoundError) as exc:
        return fail(exc)
    print(format_table(_display(p)))
    if out is not None:
        for path in write_outputs(p, (cfg_a, cfg_b), out):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
