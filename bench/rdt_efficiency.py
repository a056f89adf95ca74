"""What the RDT pays for: active-row execution and the fused loss head, before vs after.

    python bench/rdt_efficiency.py                # all four sections, tables on stdout
    python bench/rdt_efficiency.py --only speed --reps 15

Sections (each compares the old way with the new one, measured in the same run):

1. ``accounting``: executed / model FLOPs per token of ``rdt-770m`` at global batch 8, 64 and
   512: ``loops.execution=masked`` (every sequence runs the global batch's max T, the old way)
   vs ``active`` (each iteration runs only the sequences still looping), with and without the
   checkpoint recompute (HFU), from :mod:`mythos.accounting` (Monte Carlo over the real sampler).
2. ``flops``: ``FlopCounterMode`` on one training forward+backward of a Poisson(8) batch of 64
   (a small RDT, checkpointing off): masked vs active vs the sequences run one by one, each at
   its own T (issue 11's bar: active <= 1.10x one by one).
3. ``memory``: peak tensor bytes allocated during one forward+backward (``bench/common.py``'s
   profiler measure) with the unfused loss head (``[B, S, 32768]`` fp32 logits kept for backward)
   vs the fused chunked head, at the presets' vocab 32768.
4. ``speed``: tiny-RDT training steps (forward, backward, AdamW) with the loop counts a real run
   draws (``LoopLayout`` of an 8-sequence micro-batch, Poisson(mean)), masked vs active,
   interleaved A/B/B/A; same model, same data, same counts -> the same model FLOPs per token, so
   the tokens/s ratio is the speed-up.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from bench.common import interleaved, machine_info, median, mib, peak_alloc_bytes, table  # noqa: E402
from mythos.accounting import executed_loops, flops_per_token  # noqa: E402
from mythos.model import build_model, load_model_config  # noqa: E402
from mythos.model.loops import sample_loop_counts  # noqa: E402


def _with_execution(cfg, execution: str):
    return dataclasses.replace(cfg, loops=dataclasses.replace(cfg.loops, execution=execution))


def accounting() -> None:
    cfg = load_model_config("rdt-770m")
    seq = cfg.max_seq_len
    model_f = flops_per_token(cfg, seq)
    rows = []
    for gb in (8, 64, 512):
        row = [str(gb)]
        for execution in ("masked", "active"):
            t, k = executed_loops(_with_execution(cfg, execution).loops, gb, steps=1000)
            exe = flops_per_token(cfg, seq, loops_mean=t, bwd_loops_mean=k)
            hw = flops_per_token(cfg, seq, loops_mean=t, bwd_loops_mean=k, include_recompute=True)
            row += [f"{t:.2f}", f"{exe.total / 1e9:.2f}", f"{exe.total / model_f.total:.3f}", f"{hw.total / 1e9:.2f}"]
        rows.append(row)
    print(f"rdt-770m, seq {seq}: model FLOPs {model_f.total / 1e9:.2f} GFLOP/token (E[T] = {model_f.loops:.2f}, "
          f"E[k] = {model_f.bwd_loops:.2f})")
    print(table(["global batch", "masked loops/seq", "masked GFLOP/tok", "masked exec/model", "masked HFU GFLOP/tok",
                 "active loops/seq", "active GFLOP/tok", "active exec/model", "active HFU GFLOP/tok"], rows))


def _train_flops(model, x, **kw) -> int:
    with FlopCounterMode(display=False) as fc:
        model(x, labels=x, **kw).loss.backward()
    return fc.get_total_flops()


def flops() -> None:
    base = load_model_config("rdt-tiny", ["vocab_size=512", "d_model=64", "n_heads=2", "mlp_hidden=128",
                                          "loops.mean=8", "loops.bwd_depth=4", "loops.max_loops=64"])
    counts = sample_loop_counts(base.loops, seed=0, step=0, global_batch=64)
    x = torch.randint(0, base.vocab_size, (64, 64), generator=torch.Generator().manual_seed(0))
    cost = {}
    for execution in ("masked", "active"):
        torch.manual_seed(0)
        cost[execution] = _train_flops(build_model(_with_execution(base, execution)).train(), x, loop_counts=counts)
    model = build_model(base).train()
    alone = sum(_train_flops(model, x[i : i + 1], num_loops=int(t)) for i, t in enumerate(counts))
    print(f"Poisson(8) batch of 64 (max T {int(counts.max())}, mean {counts.float().mean():.2f}), "
          "training forward+backward, checkpointing off:")
    print(table(["execution", "GFLOP", "vs one by one"],
                [[k, f"{v / 1e9:.3f}", f"{v / alone:.3f}"] for k, v in
                 (("one by one (own T)", alone), ("masked", cost["masked"]), ("active", cost["active"]))]))


def memory(batch: int, seq: int) -> None:
    cfg = load_model_config("dense-tiny", ["vocab_size=32768", "d_model=256", "n_heads=4", "n_layers=2",
                                           "mlp_hidden=768", f"max_seq_len={seq}"])
    torch.manual_seed(0)
    model = build_model(cfg).train()
    x = torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))

    def step(unfused: bool):
        def run() -> None:
            model.zero_grad(set_to_none=True)
            model(x, labels=x, return_logits=unfused).loss.backward()
        return run

    step(False)(), step(True)()  # warm up both paths
    peaks = {name: peak_alloc_bytes(step(unfused)) for name, unfused in (("unfused", True), ("fused", False))}
    logits = batch * seq * cfg.vocab_size * 4
    print(f"vocab {cfg.vocab_size}, micro-batch {batch} x {seq} (fp32 logits alone: {mib(logits)} MiB):")
    print(table(["loss head", "peak step alloc (MiB)", "vs unfused"],
                [[k, mib(v), f"{v / peaks['unfused']:.2f}"] for k, v in peaks.items()]))


def speed(reps: int, mean: float, batch: int, seq: int) -> None:
    from mythos.train.loop_layout import LoopLayout

    base = load_model_config("rdt-tiny", [f"loops.mean={mean}", f"max_seq_len={seq}"])
    layout = LoopLayout(base.loops, seed=0, global_batch=batch, micro_batch=batch, world_size=1, lockstep=False)
    x = torch.randint(0, base.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    steps, models = {}, {}
    for execution in ("masked", "active"):
        torch.manual_seed(0)
        model = models[execution] = build_model(_with_execution(base, execution)).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        state = {"step": 0}

        def run(model=model, opt=opt, state=state) -> None:
            counts = layout.counts(state["step"] % 16)  # the same 16 draws for both sides
            state["step"] += 1
            opt.zero_grad(set_to_none=True)
            model(x, labels=x, loop_counts=counts).loss.backward()
            opt.step()
        steps[execution] = run
    times = interleaved(steps, warmup=2, reps=reps)
    tok = batch * seq
    t_m, t_a = median(times["masked"]), median(times["active"])
    draws = torch.stack([layout.counts(s) for s in range(16)]).float()
    print(f"rdt-tiny, Poisson({mean:g}) loops, batch {batch} x {seq}, fp32, {torch.get_num_threads()} threads; "
          f"mean T {draws.mean():.2f}, mean batch max {draws.max(1).values.mean():.2f}:")
    print(table(["execution", "median step (ms)", "tokens/s", "speed-up"],
                [["masked (before)", f"{t_m * 1e3:.0f}", f"{tok / t_m:.0f}", "1.00"],
                 ["active (after)", f"{t_a * 1e3:.0f}", f"{tok / t_a:.0f}", f"{t_m / t_a:.2f}"]]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=["accounting", "flops", "memory", "speed"], default=None)
    ap.add_argument("--reps", type=int, default=9, help="timed steps per side (speed; default %(default)s)")
    ap.add_argument("--mean", type=float, default=8.0, help="speed: Poisson loop mean (default %(default)s)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {machine_info()}\n")
    sections = {"accounting": accounting, "flops": flops, "memory": lambda: memory(8, 256),
                "speed": lambda: speed(args.reps, args.mean, 8, 256)}
    for name, fn in sections.items():
        if args.only in (None, name):
            print(f"## {name}")
            fn()
            print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
