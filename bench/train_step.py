"""Training-step throughput and memory: our dense model vs Hugging Face ``LlamaForCausalLM``.

    python bench/train_step.py                       # all sizes, table on stdout
    python bench/train_step.py --sizes s m --reps 9 --rss

For each size, both models are built with the identical architecture (our Llama-style dense
config; the peer from the same ``config.json`` the exporter writes, SDPA attention) and the
identical initial weights (ours copied into the peer; the initial losses are checked equal). One
timed step = ``zero_grad(set_to_none) + forward + mean CE loss + backward + AdamW.step`` (torch's
default foreach AdamW for both) on the same random batch, fp32 on CPU.

Timing: both models live in one process and run alternately (A, B, B, A, ... after ``--warmup``
steps each), ``--reps`` steps each; we report the median step time and tokens/s
(``batch * seq_len / median``), and ``ratio = ours tokens/s / peer tokens/s`` (>= 1: we are at
least as fast). Medians of interleaved runs are robust to the background load of a shared machine
but not immune to it: rerun when the load average is high.

Memory: ``peak step alloc`` is the peak of tensor bytes allocated during one step above what was
live at its start (activations, gradients, temporaries, optimizer scratch), from the profiler's
allocation events (see ``bench/common.py``). ``--rss`` also runs each (size, model) in a fresh
subprocess and reports its peak RSS (everything: interpreter, libraries, weights, allocator slack).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import (  # noqa: E402
    REPO,
    build_hf_llama,
    current_rss_bytes,
    interleaved,
    loss_hf,
    loss_ours,
    machine_info,
    max_rss_bytes,
    median,
    mib,
    peak_alloc_bytes,
    shifted_labels,
    table,
)
from mythos.model import build_model, load_model_config  # noqa: E402


@dataclass(frozen=True)
class Size:
    name: str
    overrides: tuple[str, ...]
    batch: int
    seq: int


SIZES = {
    "s": Size("s", ("d_model=256", "n_heads=4", "n_layers=4", "mlp_hidden=768", "vocab_size=8192"), 8, 256),
    "m": Size("m", ("d_model=512", "n_heads=8", "n_layers=6", "mlp_hidden=1536", "vocab_size=16384"), 4, 256),
    "m-gqa": Size("m-gqa", ("d_model=512", "n_heads=8", "n_kv_heads=2", "n_layers=6", "mlp_hidden=1536",
                            "vocab_size=16384"), 4, 256),
    "l": Size("l", ("d_model=768", "n_heads=12", "n_layers=6", "mlp_hidden=2048", "vocab_size=16384"), 2, 512),
}


def make_models(size: Size, which: str = "both", seed: int = 0):
    cfg = load_model_config("dense-tiny", [*size.overrides, f"max_seq_len={size.seq}"])
    torch.manual_seed(seed)
    ours = build_model(cfg) if which in ("both", "ours") else None
    peer = build_hf_llama(cfg, ours) if which in ("both", "peer") else None
    return cfg, ours, peer


def make_step(model, loss_fn, ids, labels):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    model.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model, ids, labels)
        loss.backward()
        opt.step()

    return step


def batch_for(cfg, size: Size, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (size.batch, size.seq), generator=g)
    return ids, shifted_labels(ids)


def rss_child(size_name: str, which: str, warmup: int) -> None:
    """Subprocess entry: build one model, run ``warmup + 2`` steps, print JSON peak RSS."""
    size = SIZES[size_name]
    cfg, ours, peer = make_models(size, which)
    model, fn = (ours, loss_ours) if which == "ours" else (peer, loss_hf)
    ids, labels = batch_for(cfg, size)
    step = make_step(model, fn, ids, labels)
    before = current_rss_bytes()
    for _ in range(warmup + 2):
        step()
    print(json.dumps({"rss_before": before, "max_rss": max_rss_bytes()}))


def run_rss(size_name: str, which: str, warmup: int, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--rss-child", size_name, which, "--warmup", str(warmup),
           "--threads", str(threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])


def kernel_bench(reps: int) -> None:
    """fwd+bwd of the hot elementwise pieces, old form vs ours vs ``torch.compile`` (interleaved)."""
    import torch.nn.functional as F

    from mythos.model.layers import RMSNorm, apply_rope

    torch.manual_seed(0)
    b, h, s, d = 8, 8, 256, 64
    x = torch.randn(b, s, h * d, requires_grad=True)
    norm = RMSNorm(h * d)
    q = torch.randn(b, h, s, d, requires_grad=True)
    ang = torch.randn(s, d // 2)
    cos, sin_f = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
    sin_folded = torch.cat([-ang.sin(), ang.sin()], -1)
    gate, up = (torch.randn(b, s, 1536, requires_grad=True) for _ in range(2))

    def rope_cat(t):  # the previous (and HF Llama's) rotate-half
        return t * cos + torch.cat([-t[..., d // 2:], t[..., : d // 2]], dim=-1) * sin_f

    def swiglu(g, u):
        return F.silu(g) * u

    cases = {
        "rms_norm: F.rms_norm (composite)": lambda: F.rms_norm(x, (h * d,), norm.weight, 1e-5),
        "rms_norm: ours (custom backward)": lambda: norm(x),
        "rms_norm: torch.compile": torch.compile(lambda: F.rms_norm(x, (h * d,), norm.weight, 1e-5)),
        "rope: cat(-x2, x1) * sin": lambda: rope_cat(q),
        "rope: ours roll(x) * folded sin": lambda: apply_rope(q, cos, sin_folded),
        "rope: torch.compile": torch.compile(lambda: rope_cat(q)),
        "swiglu: eager": lambda: swiglu(gate, up),
        "swiglu: torch.compile": torch.compile(lambda: swiglu(gate, up)),
    }
    fns = {}
    for name, f in cases.items():
        def run(f=f):
            y = f()
            y.backward(torch.ones_like(y))
        fns[name] = run
    times = interleaved(fns, warmup=3, reps=reps)
    print(table(["kernel (fwd+bwd, fp32)", "median (ms)"], [[n, f"{median(t) * 1e3:.2f}"] for n, t in times.items()]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    ap.add_argument("--rss", action="store_true", help="also measure peak RSS, one subprocess per (size, model)")
    ap.add_argument("--kernels", action="store_true", help="only micro-benchmark RMSNorm / RoPE / SwiGLU variants")
    ap.add_argument("--rss-child", nargs=2, metavar=("SIZE", "WHICH"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.kernels:
        print(f"machine: {machine_info()}")
        kernel_bench(max(args.reps, 9))
        return 0
    if args.rss_child:
        rss_child(*args.rss_child, args.warmup)
        return 0

    print(f"machine: {machine_info()}")
    header = ["size", "params (M)", "batch x seq", "ours step (ms)", "peer step (ms)", "ours tok/s", "peer tok/s",
              "ratio ours/peer", "ours peak step alloc (MiB)", "peer peak step alloc (MiB)"]
    if args.rss:
        header += ["ours peak RSS (MiB)", "peer peak RSS (MiB)"]
    rows = []
    for name in args.sizes:
        size = SIZES[name]
        cfg, ours, peer = make_models(size)
        ids, labels = batch_for(cfg, size)
        with torch.no_grad():  # same architecture and weights => same loss
            la, lb = loss_ours(ours, ids, labels).item(), loss_hf(peer, ids).item()
        if abs(la - lb) > 1e-4 * max(1.0, abs(la)):
            raise SystemExit(f"size {name}: initial losses differ (ours {la:.6f}, peer {lb:.6f}); not the same model")
        steps = {"ours": make_step(ours, loss_ours, ids, labels), "peer": make_step(peer, loss_hf, ids, labels)}
        times = interleaved(steps, warmup=args.warmup, reps=args.reps)
        tok = size.batch * size.seq
        t_ours, t_peer = median(times["ours"]), median(times["peer"])
        mem = {k: peak_alloc_bytes(fn) for k, fn in steps.items()}
        row = [name, f"{sum(p.numel() for p in ours.parameters()) / 1e6:.1f}", f"{size.batch} x {size.seq}",
               f"{t_ours * 1e3:.0f}", f"{t_peer * 1e3:.0f}", f"{tok / t_ours:.0f}", f"{tok / t_peer:.0f}",
               f"{t_peer / t_ours:.3f}", mib(mem["ours"]), mib(mem["peer"])]
        del ours, peer, steps
        if args.rss:
            row += [mib(run_rss(name, w, args.warmup, args.threads)["max_rss"]) for w in ("ours", "peer")]
        rows.append(row)
        print(f"  {name}: ours {t_ours * 1e3:.0f} ms (min {min(times['ours']) * 1e3:.0f}), "
              f"peer {t_peer * 1e3:.0f} ms (min {min(times['peer']) * 1e3:.0f}), initial loss {la:.4f}", flush=True)
    print()
    print(table(header, rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
