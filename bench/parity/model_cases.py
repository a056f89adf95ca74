"""The RDT's behaviour as data, for comparing two revisions (``bench/parity/compare_revisions.py``).

    PYTHONPATH=CHECKOUT python bench/parity/model_cases.py save OUT.pt     # ~35 s on 2 cores
    python bench/parity/model_cases.py compare A.pt B.pt                  # exit 1 on any difference

~430 cases: active rows and masked execution, each with ACT, LoRA (+ loop embedding, value
embeddings, qk-norm, relu2), MoE, concat / additive injection, full and truncated backprop,
``checkpoint_loops`` / ``checkpoint_layers``, explicit / sampled / equal / sorted loop counts,
zero-row lockstep iterations, given and drawn ``h0``; eval with and without grad; the per-row
adaptive exit (KL thresholds, ACT, last / all positions); cached decoding (prefill, token by token,
``generate``, the batch-wide stop). Each records logits, loss, ce_sum, aux_loss, every aux entry
(and their order), every parameter gradient, the KV cache, the rows each core call ran on and the
global RNG state afterwards; ``compare`` requires ``torch.equal`` on all of it.

The mythos imported is the one on ``PYTHONPATH`` (this script adds no path of its own), so the
same cases run against any checkout whose public model API they use.
"""

from __future__ import annotations

import dataclasses
import sys

import torch

import mythos
from mythos.model import KVCache, ModelConfig
from mythos.model.config import ACTConfig, LoopConfig, LoRAConfig, MoEConfig

VOCAB = 97
B, S = 6, 12
COUNTS = torch.tensor([2, 5, 1, 3, 5, 4])  # unsorted on purpose


def cfg(execution: str = "active", **kw) -> ModelConfig:
    loops = kw.pop("loops", None) or LoopConfig(schedule="poisson", mean=3, bwd_depth=2, max_loops=16)
    loops = dataclasses.replace(loops, execution=execution)
    base = dict(kind="rdt", vocab_size=VOCAB, d_model=32, n_heads=2, max_seq_len=64, zero_init_out=False,
                n_prelude=1, n_core=2, n_coda=1, init_std=0.3, loops=loops)
    base.update(kw)
    c = ModelConfig(**base)
    c.validate()
    return c


def build(c: ModelConfig, train: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    m = mythos.build_model(c)
    with torch.no_grad():  # LoRA banks and the loop embedding start at 0: make iterations distinct
        for name, p in m.named_parameters():
            if p.dim() == 3 or name.startswith("loop_embed"):
                p.normal_(std=0.1)
    return m.train(train)


def x_ids(b: int = B, s: int = S, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, s), generator=torch.Generator().manual_seed(seed))


def record(m: torch.nn.Module, out: object, rows: list[int], cache: KVCache | None = None) -> dict:
    r: dict = {"rows": torch.tensor(rows)}
    for k in ("logits", "loss", "ce_sum", "aux_loss"):
        v = getattr(out, k)
        if v is not None:
            r[k] = v.detach().clone()
    for k, v in out.aux.items():
        r[f"aux.{k}"] = v.detach().clone()
    r["aux_keys"] = list(out.aux.keys())
    for n, p in m.named_parameters():
        if p.grad is not None:
            r[f"grad.{n}"] = p.grad.clone()
    if cache is not None:
        for key in sorted(cache.store):
            r[f"cache.{key}.k"], r[f"cache.{key}.v"] = (t.clone() for t in cache.store[key])
        r["cache_pos"] = cache.pos
    r["rng"] = torch.get_rng_state().clone()
    return r


def hooked(m: torch.nn.Module) -> tuple[list[int], object]:
    rows: list[int] = []
    h = m.core[0].register_forward_hook(lambda mod, i, o: rows.append(i[0].shape[0]))
    return rows, h


def train_case(c: ModelConfig, *, with_h0: bool = False, backward: bool = True, seed: int = 5,
               n_forwards: int = 2, **kw) -> dict:
    m = build(c, train=True)
    res = {}
    torch.manual_seed(seed)  # h0 noise draws come from here
    for step in range(n_forwards):
        rows, h = hooked(m)
        m.zero_grad(set_to_none=True)
        x = x_ids(seed=1 + step)
        h0 = torch.randn(B, S, c.d_model, generator=torch.Generator().manual_seed(2)) * 0.02 if with_h0 else None
        out = m(x, labels=x, return_logits=True, h0=h0, **kw)
        if backward:
            out.loss.backward()
        h.remove()
        res[f"step{step}"] = record(m, out, rows)
    return res


def eval_case(c: ModelConfig, *, grad: bool = False, labels: bool = True, **kw) -> dict:
    m = build(c, train=False)
    rows, h = hooked(m)
    x = x_ids()
    with torch.set_grad_enabled(grad):
        out = m(x, labels=x if labels else None, return_logits=True, **kw)
        if grad:
            out.loss.backward()
    h.remove()
    return record(m, out, rows)


def decode_case(c: ModelConfig, steps: int = 4, **kw) -> dict:
    """Prefill then token-by-token decode with a cache; every forward's outputs and the final cache."""
    m = build(c, train=False)
    seq = x_ids(seed=7)
    cache = KVCache()
    res = {}
    with torch.no_grad():
        for i, end in enumerate(range(S - steps, S + 1)):
            rows, h = hooked(m)
            out = m(seq[:, (0 if i == 0 else end - 1):end], cache=cache, **kw)
            h.remove()
            res[f"fwd{i}"] = record(m, out, rows, cache if end == S else None)
        res["generate"] = {"ids": m.generate(x_ids(seed=8)[:, :5], 4, **kw)}
    return res


def cases() -> dict:
    act = dict(act=ACTConfig(enabled=True, halt_bias_init=-1.0))
    lora = dict(lora=LoRAConfig(rank=4, max_iters=8), loop_embed=True, value_embeds="alternating", qk_norm=True,
                mlp="relu2")
    moe = dict(moe=MoEConfig(enabled=True, num_experts=4, top_k=2, num_shared=1))
    full_bp = dict(loops=LoopConfig(schedule="poisson", mean=3, bwd_depth=0, max_loops=16))
    C: dict = {}
    for ex in ("active", "masked"):
        opts = {"plain": {}, "act": act, "lora": lora, "moe": moe, "concat": dict(injection="concat"),
                "additive": dict(injection="additive"), "fullbp": full_bp,
                "act-moe-lora": {**act, **moe, **lora}}
        for name, o in opts.items():
            for ck in (False, True):
                tag = f"train/{ex}/{name}/{'ckpt' if ck else 'nockpt'}"
                c = cfg(ex, checkpoint_loops=ck, **o)
                C[tag + "/counts"] = lambda c=c: train_case(c, loop_counts=COUNTS, n_steps=7)
                C[tag + "/counts-h0"] = lambda c=c: train_case(c, with_h0=True, loop_counts=COUNTS)
            c = cfg(ex, **o)
            C[f"train/{ex}/{name}/sampled"] = lambda c=c: train_case(c)  # model-drawn counts, h0 noise
            C[f"train/{ex}/{name}/num_loops"] = lambda c=c: train_case(c, num_loops=5)
            C[f"train/{ex}/{name}/sorted-counts"] = lambda c=c: train_case(
                c, loop_counts=torch.tensor([5, 4, 4, 2, 1, 1]))
            C[f"train/{ex}/{name}/equal-counts"] = lambda c=c: train_case(c, loop_counts=torch.full((B,), 3))
            C[f"train/{ex}/{name}/ckpt-layers"] = lambda c=c: train_case(
                dataclasses.replace(c, checkpoint_layers=True, checkpoint_loops=True), loop_counts=COUNTS)
            C[f"train/{ex}/{name}/nograd"] = lambda c=c: train_case(c, backward=False, loop_counts=COUNTS)
            C[f"eval/{ex}/{name}/counts"] = lambda c=c: eval_case(c, loop_counts=COUNTS)
            C[f"eval/{ex}/{name}/counts-grad"] = lambda c=c: eval_case(c, grad=True, loop_counts=COUNTS, n_steps=6)
            C[f"eval/{ex}/{name}/num_loops"] = lambda c=c: eval_case(c, num_loops=4)
            C[f"eval/{ex}/{name}/default"] = lambda c=c: eval_case(c)
    # zero-active-row lockstep iterations
    C["train/active/zero-rows"] = lambda: train_case(cfg("active", checkpoint_loops=True),
                                                   loop_counts=torch.tensor([1, 2, 1, 1, 2, 1]), n_steps=5)
    C["train/noise-h0-fixed"] = lambda: train_case(cfg("active", loops=LoopConfig(schedule="fixed", mean=4,
                                                                                  bwd_depth=2)))
    # adaptive exits (eval), per row
    for name, o in {"plain": {}, "act": act, "lora": lora, "moe": moe, "act-moe-lora": {**act, **moe, **lora},
                    "concat": dict(injection="concat")}.items():
        c = cfg("active", **o)
        for thr in (3e-2, 1e-3, 1e-5, 0.12, 0.8):
            C[f"adaptive/{name}/kl{thr}"] = lambda c=c, thr=thr: eval_case(c, num_loops=16, exit_kl=thr)
            C[f"adaptive/{name}/kl{thr}-all"] = lambda c=c, thr=thr: eval_case(
                c, num_loops=16, exit_kl=thr, exit_positions="all")
            C[f"adaptive/{name}/kl{thr}-grad"] = lambda c=c, thr=thr: eval_case(c, grad=True, num_loops=10,
                                                                                 exit_kl=thr)
            C[f"adaptive/{name}/kl{thr}-h0"] = lambda c=c, thr=thr: eval_case(
                c, num_loops=10, exit_kl=thr,
                h0=torch.randn(B, S, c.d_model, generator=torch.Generator().manual_seed(4)) * 0.1)
            C[f"decode/{name}/kl{thr}"] = lambda c=c, thr=thr: decode_case(c, num_loops=12, exit_kl=thr)
        if "act" in name:
            C[f"adaptive/{name}/act"] = lambda c=c: eval_case(c, num_loops=24, exit_act=True)
            C[f"adaptive/{name}/act-kl"] = lambda c=c: eval_case(c, num_loops=24, exit_act=True, exit_kl=1e-3)
            C[f"adaptive/{name}/act-grad"] = lambda c=c: eval_case(c, grad=True, num_loops=12, exit_act=True)
            C[f"decode/{name}/act-default"] = lambda c=c: decode_case(c, num_loops=12)  # ACT exit by default
            C[f"decode/{name}/act-off"] = lambda c=c: decode_case(c, num_loops=12, exit_act=False)
        C[f"decode/{name}/fixed"] = lambda c=c: decode_case(c, num_loops=6)
        # cache + explicit loop_counts: the fixed trunk's batch-wide stop (masked, cache)
        for kl in (1e9, 3e-2, 1e-12):
            ck = dataclasses.replace(c, early_exit_kl=kl)
            C[f"decode/{name}/counts-batchstop{kl}"] = lambda ck=ck: decode_case(ck, loop_counts=torch.full((B,), 8))
            C[f"decode/{name}/cfg-kl{kl}"] = lambda ck=ck: decode_case(ck, num_loops=8)
        C[f"decode/{name}/counts-varied"] = lambda c=c: decode_case(dataclasses.replace(c, early_exit_kl=3e-2),
                                                                    loop_counts=COUNTS)
    return C


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def save(path: str) -> None:
    torch.set_num_threads(1)
    res = {}
    for name, fn in cases().items():
        res[name] = fn()
    torch.save(res, path)
    print(f"saved {len(res)} cases to {path}")


def same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return a == b


def compare(pa: str, pb: str) -> None:
    a, b = torch.load(pa, weights_only=False), torch.load(pb, weights_only=False)
    fa, fb = flatten(a), flatten(b)
    bad = [k for k in sorted(set(fa) | set(fb)) if k not in fa or k not in fb or not same(fa[k], fb[k])]
    n_grads = sum(1 for k in fa if "/grad." in k)
    n_cache = sum(1 for k in fa if "/cache." in k)
    exits = sorted({tuple(v.tolist()) for k, v in fa.items() if k.endswith("aux.exit_loops")})
    print(f"cases: {len(a)} vs {len(b)}; compared entries: {len(set(fa) | set(fb))} "
          f"(grad tensors {n_grads}, cache tensors {n_cache}); distinct exit_loops vectors: {len(exits)}")
    print(f"mismatches: {len(bad)}")
    for k in bad[:40]:
        print("  MISMATCH", k)
    print("ALL torch.equal" if not bad else "PARITY FAILED")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "save":
        save(sys.argv[2])
    elif len(sys.argv) == 4 and sys.argv[1] == "compare":
        compare(sys.argv[2], sys.argv[3])
    else:
        sys.exit("usage: model_cases.py save OUT.pt | compare A.pt B.pt")
