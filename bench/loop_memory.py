"""RDT activation memory and step time as the loop count T grows.

    python bench/loop_memory.py                        # T = 2 4 8 16 32, four modes
    python bench/loop_memory.py --loops 2 4 8 --reps 5

Modes: full backprop (``loops.bwd_depth=0``) or truncated (``bwd_depth=k``, default 4), each with
and without per-iteration activation checkpointing (``checkpoint_loops``). Every sequence runs
exactly T iterations (``num_loops=T``, training mode). One measured step = forward + loss +
backward (no optimizer: its memory does not depend on T).

Columns (see ``bench/common.py`` for how CPU memory is measured):

- ``held after fwd``: tensor bytes allocated during the forward and still live when it returns --
  what the graph holds for backward (saved activations, checkpoint inputs, the logits/loss).
- ``peak fwd+bwd``: peak tensor bytes allocated during forward + backward above the level at the
  start (parameters excluded), i.e. activations + gradients + temporaries at the worst moment.
- ``saved``: bytes of distinct tensors that autograd saved for backward, from
  ``torch.autograd.graph.saved_tensors_hooks`` (inside a non-reentrant checkpoint the checkpoint's
  own hooks take over, so this shows what checkpointing removed; its inputs are in ``held``).
- ``step``: median seconds of forward + backward over ``--reps`` (modes interleaved per T).

Expected: with truncated backprop memory is flat in T (only the last k iterations build a
graph); with full backprop it grows linearly without checkpointing and is nearly flat with it
(one ``[B, S, d]`` input per iteration). Target: full backprop + checkpointing, T=32 <= 1.25x T=4.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

from bench.common import machine_info, median, mib, shifted_labels, table  # noqa: E402
from mythos.model import build_model, load_model_config  # noqa: E402
from mythos.model.config import LoopConfig  # noqa: E402

_MARK = "loop_memory::backward"


def saved_bytes(fn) -> int:
    """Bytes of distinct storages autograd saves for backward while ``fn()`` runs."""
    seen: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor):
        st = t.untyped_storage()
        seen[(st.data_ptr(), st.nbytes())] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def memory_profile(model, ids, labels, T: int) -> tuple[int, int]:
    """(bytes held after forward, peak bytes over forward+backward), from allocator events."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = model(ids, labels, num_loops=T).loss
        with record_function(_MARK):
            loss.backward()
    events = prof.profiler.kineto_results.events()
    mark = min(e.start_ns() for e in events if e.name() == _MARK)
    mem = sorted((e for e in events if e.name() == "[memory]" and str(e.device_type()) == "DeviceType.CPU"),
                 key=lambda e: e.start_ns())
    cur = peak = held = 0
    for e in mem:
        if e.start_ns() < mark:
            held = cur + e.nbytes()
        cur += e.nbytes()
        peak = max(peak, cur)
    return held, peak


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--loops", nargs="+", type=int, default=[2, 4, 8, 16, 32])
    ap.add_argument("--k", type=int, default=4, help="truncated backprop depth for the truncated modes")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--overrides", nargs="*", default=["d_model=256", "n_heads=4", "mlp_hidden=768",
                                                        "vocab_size=8192", "n_prelude=1", "n_core=2", "n_coda=1"])
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    base = load_model_config("rdt-tiny", [*args.overrides, f"max_seq_len={args.seq}"])
    modes = {
        "full": (0, False), "full+ckpt": (0, True),
        f"k={args.k}": (args.k, False), f"k={args.k}+ckpt": (args.k, True),
    }
    models = {}
    for name, (k, ckpt) in modes.items():
        cfg = dataclasses.replace(base, checkpoint_loops=ckpt,
                                  loops=LoopConfig(schedule="fixed", mean=4, bwd_depth=k, max_loops=max(args.loops)))
        torch.manual_seed(0)
        models[name] = build_model(cfg).train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, base.vocab_size, (args.batch, args.seq), generator=g)
    labels = shifted_labels(ids)

    print(f"machine: {machine_info()}")
    print(f"model: d={base.d_model}, prelude/core/coda={base.n_prelude}/{base.n_core}/{base.n_coda}, "
          f"vocab={base.vocab_size}; batch {args.batch} x seq {args.seq}; fp32; fwd+bwd per step", flush=True)
    results: dict[tuple[str, int], dict[str, float]] = {}
    for T in args.loops:
        for name, model in models.items():
            s, _ = saved_bytes(lambda m=model, t=T: m(ids, labels, num_loops=t).loss)
            model.zero_grad(set_to_none=True)
            held, peak = memory_profile(model, ids, labels, T)
            model.zero_grad(set_to_none=True)
            results[name, T] = {"saved": s, "held": held, "peak": peak, "times": []}
        for r in range(args.reps + 1):  # first round is warmup
            for name, model in models.items():
                t0 = time.perf_counter()
                model(ids, labels, num_loops=T).loss.backward()
                dt = time.perf_counter() - t0
                model.zero_grad(set_to_none=True)
                if r:
                    results[name, T]["times"].append(dt)
        print(f"  T={T}: " + ", ".join(f"{n} {mib(results[n, T]['peak'])} MiB / {median(results[n, T]['times']):.2f} s"
                                      for n in models), flush=True)

    rows = []
    for name in models:
        ref = results.get((name, 4))
        for T in args.loops:
            r = results[name, T]
            rel = f"{r['peak'] / ref['peak']:.2f}x" if ref else "-"
            rows.append([name, T, mib(r["saved"]), mib(r["held"]), mib(r["peak"]), rel, f"{median(r['times']):.2f}"])
    print()
    print(table(["mode", "T", "saved (MiB)", "held after fwd (MiB)", "peak fwd+bwd (MiB)", "peak vs T=4",
                 "step (s)"], rows))
    if (4 in args.loops and 32 in args.loops):
        ratio = results["full+ckpt", 32]["peak"] / results["full+ckpt", 4]["peak"]
        print(f"\nfull backprop + checkpoint_loops: peak(T=32) / peak(T=4) = {ratio:.2f} (target <= 1.25): "
              f"{'OK' if ratio <= 1.25 else 'MISSED'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
