"""GPU training-step throughput and MFU (bf16, one GPU), ours vs the Hugging Face Llama peer.

    python bench/gpu_mfu.py                                   # every model, compile off and on
    python bench/gpu_mfu.py --models dense-1.3b-llama hf-llama-1.3b --compile off on
    python bench/gpu_mfu.py --models rdt-770m --compile on --micro-batch 4 --steps 10 --json out.json

Exits 0 with a message when CUDA is not available.

Models: ``dense-1.3b``, ``dense-1.3b-llama``, ``rdt-770m``, ``rdt-770m-swiglu`` (our presets) and
``hf-llama-1.3b`` (``transformers.LlamaForCausalLM`` with ``dense-1.3b-llama``'s exact config and
our initial weights, SDPA attention). Each is trained for ``--warmup`` + ``--steps`` steps on a
fixed random batch of ``--micro-batch`` x ``--seq`` tokens:

- bf16 parameters, gradients and optimizer state (the model is cast with ``.to(bfloat16)``), torch
  ``AdamW(fused=True)``; the loss upcasts logits to fp32 (both implementations do);
- ``--compile on``: ours dense and the HF peer: ``torch.compile(model)``; our RDT:
  ``model.compile_blocks()`` (per-block compile; the loop count varies per step, which would
  recompile a whole-model graph). ``off``: eager.
- the RDT runs its preset schedule (Poisson(8) per sequence, gradients through the last 4
  iterations, per-iteration activation checkpointing); with active-row execution (the default)
  each sequence runs its own T, and the model reports the iterations it executed per step.

Reported per configuration: median step time (wall clock, synchronised each step), tokens/s
(per GPU), MFU = tokens/s * model FLOPs per token / peak, HFU = the same with the FLOPs the
hardware actually ran (the executed loop count per step, plus activation-checkpoint recompute),
peak allocated memory, and the micro-batch used. FLOPs come from :mod:`mythos.accounting`
(``6N + 12 L S d`` convention; lookups excluded) and the peak from
``peak_flops_for_device(torch.cuda.get_device_name())`` (``--peak-tflops`` overrides).

Out of memory: the micro-batch is halved and the configuration retried (the table notes it).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import shifted_labels, table  # noqa: E402
from mythos.accounting import flops_per_token, mfu, peak_flops_for_device  # noqa: E402
from mythos.model import build_model, load_model_config  # noqa: E402

#: bench name -> (model preset, implementation)
MODELS = {
    "dense-1.3b": ("dense-1.3b", "ours"),
    "dense-1.3b-llama": ("dense-1.3b-llama", "ours"),
    "hf-llama-1.3b": ("dense-1.3b-llama", "hf"),
    "rdt-770m": ("rdt-770m", "ours"),
    "rdt-770m-swiglu": ("rdt-770m-swiglu", "ours"),
}


#: ``--smoke``: shrink every preset so the whole script runs on CPU in seconds (checks the code
#: path, not performance).
_SMOKE = {"dense": ["d_model=128", "n_heads=2", "n_layers=2", "vocab_size=512"],
          "rdt": ["d_model=128", "n_heads=2", "n_prelude=1", "n_core=1", "n_coda=1", "vocab_size=512",
                  "loops.mean=3"]}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(preset: str, impl: str, seq: int, device: torch.device, smoke: bool = False):
    kind = load_model_config(preset).kind
    cfg = load_model_config(preset, [*(_SMOKE[kind] if smoke else []), f"max_seq_len={max(seq, 2048)}"])
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the GPU (fast); rope tables are moved by .to below
        model = build_model(cfg)
        if impl == "hf":
            from bench.common import build_hf_llama

            peer = build_hf_llama(cfg, model)
            del model
            model = peer
    model.to(device=device, dtype=torch.bfloat16)
    return cfg, model.train()


def run_config(name: str, compile_on: bool, micro_batch: int, args, device: torch.device) -> dict:
    """One (model, compile, micro-batch) measurement. Raises torch.OutOfMemoryError."""
    preset, impl = MODELS[name]
    cfg, model = build(preset, impl, args.seq, device, args.smoke)
    runner = model
    if compile_on:
        if impl == "ours" and cfg.kind == "rdt":
            model.compile_blocks()
        else:
            runner = torch.compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1, fused=True)
    g = torch.Generator(device=device).manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (micro_batch, args.seq), device=device, generator=g)
    labels = shifted_labels(ids)
    executed: list[tuple[float, float]] = []

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        if impl == "hf":
            loss = runner(input_ids=ids, labels=ids, use_cache=False).loss
        else:
            out = runner(ids, labels)
            loss = out.loss
            if "loops_executed" in out.aux:  # CPU tensors: reading them does not sync the GPU
                executed.append((float(out.aux["loops_executed"]), float(out.aux["bwd_loops_executed"])))
        loss.backward()
        opt.step()
        return loss.detach()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t_compile = time.perf_counter()
    first_loss = step()
    for _ in range(args.warmup - 1):
        step()
    _sync(device)
    warmup_s = time.perf_counter() - t_compile
    executed.clear()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    tokens = micro_batch * args.seq
    tok_s = tokens / step_s
    model_flops = flops_per_token(cfg, args.seq)
    if cfg.kind == "rdt":
        t_exec = statistics.fmean(e[0] for e in executed)
        k_exec = statistics.fmean(e[1] for e in executed)
        hw_flops = flops_per_token(cfg, args.seq, loops_mean=t_exec, bwd_loops_mean=k_exec, include_recompute=True)
    else:
        t_exec = None
        hw_flops = flops_per_token(cfg, args.seq, include_recompute=True)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else _device_peak(device)
    return {
        "model": name, "impl": impl, "preset": preset, "compile": compile_on, "micro_batch": micro_batch,
        "seq": args.seq, "step_s": step_s, "min_step_s": min(times), "tokens_per_s": tok_s,
        "gflop_per_token": model_flops.total / 1e9, "hw_gflop_per_token": hw_flops.total / 1e9,
        "mfu": mfu(tok_s, model_flops, peak) if peak else None,
        "hfu": mfu(tok_s, hw_flops, peak) if peak else None,
        "loops_expected": model_flops.loops if cfg.kind == "rdt" else None, "loops_executed": t_exec,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0,
        "warmup_s": warmup_s,
        "first_loss": float(first_loss), "last_loss": float(loss),
    }


def _device_peak(device: torch.device) -> float | None:
    return peak_flops_for_device(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def cleanup() -> None:
    gc.collect()
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--compile", nargs="+", default=["off", "on"], choices=["off", "on"])
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps (compilation happens here)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="override the device's bf16 peak")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny models on CPU (seq 64, 1+1 steps): exercises the code path without a GPU")
    args = ap.parse_args(argv)
    args.warmup = max(1, args.warmup)
    if args.smoke:
        device = torch.device("cpu")
        args.seq, args.micro_batch, args.warmup, args.steps = 64, 2, 1, 1
        name = "cpu (smoke test)"
    elif not torch.cuda.is_available():
        print("bench/gpu_mfu.py: CUDA is not available on this machine; nothing to measure (skipped).")
        return 0
    else:
        device = torch.device("cuda", torch.cuda.current_device())
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        name = torch.cuda.get_device_name(device)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else _device_peak(device)
    print(f"device: {name}; bf16 peak {peak / 1e12:.1f} TFLOP/s" if peak else
          f"device: {name}; unknown bf16 peak (pass --peak-tflops for MFU)")
    print(f"torch {torch.__version__}; seq {args.seq}; micro-batch {args.micro_batch}; "
          f"{args.warmup} warmup + {args.steps} timed steps", flush=True)

    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}"

    results = []
    for model_name in args.models:
        for comp in args.compile:
            mb, note = args.micro_batch, ""
            while mb >= 1:
                oom = False
                try:
                    res = run_config(model_name, comp == "on", mb, args, device)
                except torch.OutOfMemoryError:
                    oom = True
                except Exception as exc:  # noqa: BLE001 - report and carry on with the next config
                    # an OOM inside compilation can arrive wrapped (e.g. BackendCompilerFailed)
                    oom = "out of memory" in str(exc).lower()
                    if not oom:
                        traceback.print_exc()
                        res = {"model": model_name, "compile": comp == "on", "micro_batch": mb,
                               "error": f"{type(exc).__name__}: {exc}"[:200]}
                cleanup()
                if not oom:
                    break
                note += f"OOM at mb={mb}; "
                print(f"  {model_name} compile={comp}: out of memory at micro-batch {mb}, halving", flush=True)
                mb //= 2
            else:
                res = {"model": model_name, "compile": comp == "on", "micro_batch": 0, "error": "OOM at micro-batch 1"}
            res["note"] = note.rstrip("; ")
            results.append(res)
            if "error" in res:
                print(f"  {model_name} compile={comp}: FAILED {res['error']}", flush=True)
            else:
                print(f"  {model_name} compile={comp} mb={res['micro_batch']}: {res['tokens_per_s']:.0f} tok/s, "
                      f"MFU {pct(res['mfu'])}%, step {res['step_s'] * 1e3:.0f} ms, "
                      f"peak {res['peak_mem_gib']:.1f} GiB, loss {res['first_loss']:.3f} -> {res['last_loss']:.3f}, "
                      f"warmup {res['warmup_s']:.0f} s", flush=True)

    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["model"], "on" if r["compile"] else "off", r["micro_batch"], "-", "-", "-", "-", "-", "-",
                         "-", r["error"]])
            continue
        loops = "-" if r["loops_executed"] is None else f"{r['loops_expected']:.2f} / {r['loops_executed']:.2f}"
        rows.append([r["model"], "on" if r["compile"] else "off", r["micro_batch"], f"{r['step_s'] * 1e3:.0f}",
                     f"{r['tokens_per_s']:.0f}", f"{r['gflop_per_token']:.2f}", pct(r["mfu"]), pct(r["hfu"]), loops,
                     f"{r['peak_mem_gib']:.1f}", r["note"]])
    print()
    print(table(["model", "compile", "micro-batch", "step (ms)", "tokens/s", "GFLOP/token", "MFU %", "HFU %",
                 "E[T] / executed T", "peak mem (GiB)", "note"], rows))
    by = {(r["model"], r["compile"]): r for r in results if "error" not in r}
    for comp in (False, True):
        a, b = by.get(("dense-1.3b-llama", comp)), by.get(("hf-llama-1.3b", comp))
        if a and b:
            print(f"dense-1.3b-llama / HF Llama tokens/s (compile {'on' if comp else 'off'}): "
                  f"{a['tokens_per_s'] / b['tokens_per_s']:.3f}")
    if args.json:
        args.json.write_text(json.dumps({"device": name, "peak_flops": peak, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
