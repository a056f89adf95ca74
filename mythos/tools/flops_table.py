"""``mythos-accounting``: the parameter and FLOPs-per-token table of model or run configs.

Every number comes from :mod:`mythos.accounting` (its docstring is the conventions' contract);
this module only lays them out, one column per config::

    mythos-accounting rdt-770m dense-1.3b --seq-len 2048
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from mythos.accounting import (
    FlopsBreakdown,
    ParamCounts,
    count_params,
    executed_loops,
    flops_per_token,
    meta_model,
)
from mythos.cli_common import ArgumentParser, fail, parse_int_list
from mythos.config import ConfigError, load_yaml, resolve_config_path
from mythos.model.build import load_model_config
from mythos.model.config import ModelConfig
from mythos.train.config import load_run_config


def _table(cfgs: Sequence[ModelConfig], seq_len: int, global_batches: Sequence[int] = ()) -> str:
    cols: list[tuple[ParamCounts, FlopsBreakdown, FlopsBreakdown]] = []
    for cfg in cfgs:
        model = meta_model(cfg)
        cols.append((count_params(cfg, model), flops_per_token(cfg, seq_len, model=model),
                     flops_per_token(cfg, seq_len, include_recompute=True, model=model)))
    part_names = list(dict.fromkeys(p for pc, _, _ in cols for p in pc.parts))
    rows: list[tuple[str, list[str]]] = [("", [pc.name or pc.kind for pc, _, _ in cols])]

    def section(title: str) -> None:
        rows.append((title, [""] * len(cols)))

    def row(label: str, values: list[str]) -> None:
        rows.append(("  " + label, values))

    section("parameters (M)")
    for part in part_names:
        row(part, [f"{pc.parts[part] / 1e6:.2f}" if part in pc.parts else "-" for pc, _, _ in cols])
    row("total", [f"{pc.total / 1e6:.2f}" for pc, _, _ in cols])
    row("embedding", [f"{pc.embedding / 1e6:.2f}" for pc, _, _ in cols])
    row("non-embedding", [f"{pc.non_embedding / 1e6:.2f}" for pc, _, _ in cols])
    section("matmul params per token (M)")
    row("once (pre+post+head)", [f"{(f.matmul.pre + f.matmul.post + f.matmul.head) / 1e6:.2f}"
                                 for _, f, _ in cols])
    row("per loop (core)", [f"{f.matmul.core / 1e6:.2f}" if pc.kind == "rdt" else "-" for pc, f, _ in cols])
    row("E[T] / E[k]", [f"{f.loops:.2f} / {f.bwd_loops:.2f}" if pc.kind == "rdt" else "-"
                        for pc, f, _ in cols])
    section(f"GFLOP per token (seq_len={seq_len})")
    row("forward", [f"{f.forward / 1e9:.3f}" for _, f, _ in cols])
    row("backward", [f"{f.backward / 1e9:.3f}" for _, f, _ in cols])
    row("total (MFU)", [f"{f.total / 1e9:.3f}" for _, f, _ in cols])
    row("  of which attention", [f"{f.attention / 1e9:.3f}" for _, f, _ in cols])
    row("total excl. attention", [f"{f.total_no_attention / 1e9:.3f}" for _, f, _ in cols])
    row("fwd excl. attention", [f"{(f.forward - f.attn_forward) / 1e9:.3f}" for _, f, _ in cols])
    row("bwd excl. attention", [f"{(f.backward - f.attn_backward) / 1e9:.3f}" for _, f, _ in cols])
    row("recompute (ckpt)", [f"{h.recompute / 1e9:.3f}" for _, _, h in cols])
    row("total (HFU)", [f"{h.total / 1e9:.3f}" for _, _, h in cols])
    if global_batches and any(c.kind == "rdt" for c in cfgs):
        section("executed / model FLOPs (RDT, excl. recompute)")
        for gb in global_batches:
            for execution in ("active", "masked"):
                vals = []
                for cfg, (_, f, _) in zip(cfgs, cols):
                    if cfg.kind != "rdt":
                        vals.append("-")
                        continue
                    loops = dataclasses.replace(cfg.loops, execution=execution)
                    t, k = executed_loops(loops, gb, steps=500)
                    exe = flops_per_token(cfg, seq_len, loops_mean=t, bwd_loops_mean=k, model=meta_model(cfg))
                    vals.append(f"{exe.total / f.total:.3f} (loops {t:.2f})")
                row(f"batch {gb}, {execution}", vals)

    w0 = max(len(label) for label, _ in rows)
    widths = [max(len(vals[i]) for _, vals in rows) for i in range(len(cols))]
    lines = []
    for label, vals in rows:
        lines.append(label.ljust(w0) + "".join("  " + v.rjust(w) for v, w in zip(vals, widths)))
    return "\n".join(lines)


def build_parser() -> ArgumentParser:
    """The ``mythos-accounting`` argument parser."""
    parser = ArgumentParser(
        prog="mythos-accounting",
        description="Parameter counts and training FLOPs per token of configs (docs/design.md, 'FLOPs accounting').",
    )
    parser.add_argument("items", nargs="+", metavar="CONFIG|key=value",
                        help="model or run YAMLs, or preset names; key=value overrides apply to all of them")
    parser.add_argument("--seq-len", type=int, default=0, help="sequence length (0 = each model's max_seq_len)")
    parser.add_argument("--global-batch", default="8,64,512",
                        help="RDT: global batch sizes of the executed/model FLOPs rows (default %(default)s)")
    return parser


def load_config_for_accounting(path: str, overrides: Sequence[str]) -> ModelConfig:
    """A model YAML or preset, or a run config (its ``model`` section; ``model.``-prefixed
    overrides apply to it, so the same ``key=value`` works for both kinds of file)."""
    try:
        raw = load_yaml(resolve_config_path(path, kind="model"))
    except ConfigError:
        raw = {}
    if isinstance(raw, dict) and "model" in raw:  # a run config (configs/run/*.yaml)
        run_overrides = [o if o.startswith("model.") else f"model.{o}" for o in overrides]
        return load_run_config(path, run_overrides).model
    return load_model_config(path, overrides)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)  # configs and overrides may follow --seq-len
    overrides = [a for a in args.items if "=" in a]
    paths = [a for a in args.items if "=" not in a]
    if not paths:
        parser.error("give at least one model config")
    if args.seq_len < 0:
        return fail(f"--seq-len must be >= 0 (0 = each model's max_seq_len), got {args.seq_len}")
    try:
        batches = parse_int_list(args.global_batch, "--global-batch", 1)
        cfgs = [load_config_for_accounting(p, overrides) for p in paths]
    except ValueError as exc:  # ConfigError: already one line
        return fail(exc)
    by_len: dict[int, list[ModelConfig]] = {}
    for cfg in cfgs:
        by_len.setdefault(args.seq_len or cfg.max_seq_len, []).append(cfg)
    print("\n\n".join(_table(group, seq_len, batches) for seq_len, group in by_len.items()))
    print("\nConventions: lookups (token/value embeddings) are not FLOPs; the LM head is a matmul; "
          "attention counts the full SxS scores (no causal halving); RDT uses E[T] forward and "
          "E[min(T, bwd_depth)] backward iterations. Executed = what the hardware runs per sequence: "
          "'active' computes only the sequences still looping (loops.execution=active, the default), "
          "'masked' runs the global batch's max T for every sequence.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
