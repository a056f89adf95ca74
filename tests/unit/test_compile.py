"""``torch.compile`` on CPU: the dense model compiled whole and the RDT compiled per block
(``compile_blocks``) match eager (loss and gradients), and a new RDT loop count does not
recompile. Skipped where compilation does not work (e.g. no C++ compiler for inductor)."""

from __future__ import annotations

import functools

import pytest
import torch

import mythos
from mythos.model import load_model_config
from mythos.model.loops import sample_loop_counts

_SMALL = ["vocab_size=256", "d_model=32", "n_heads=2", "mlp_hidden=64", "max_seq_len=32"]


@functools.cache
def _inductor_works() -> bool:
    try:
        fn = torch.compile(lambda x: torch.nn.functional.silu(x) * 2.0)
        return bool(torch.allclose(fn(torch.ones(4)), torch.nn.functional.silu(torch.ones(4)) * 2.0))
    except Exception:  # noqa: BLE001 - any backend failure means "unsupported here"
        return False


needs_inductor = pytest.mark.skipif("not _inductor_works()", reason="torch.compile (inductor) unavailable")


def _pair(preset: str, overrides: list[str]):
    cfg = load_model_config(preset, [*_SMALL, *overrides])
    torch.manual_seed(0)
    eager = mythos.build_model(cfg).train()
    torch.manual_seed(0)
    other = mythos.build_model(cfg).train()
    with torch.no_grad():  # non-zero output projections so every weight gets a gradient
        for a, b in zip(eager.parameters(), other.parameters(), strict=True):
            if a.dim() >= 2:
                a.normal_(0.0, 0.05)
            b.copy_(a)
    return cfg, eager, other


def _loss_and_grads(model, ids, **kw):
    model.zero_grad(set_to_none=True)
    loss = model(ids, ids, **kw).loss
    loss.backward()
    return loss.detach(), {n.removeprefix("_orig_mod."): p.grad.clone()
                           for n, p in model.named_parameters() if p.grad is not None}


def _assert_match(a, b) -> None:
    (la, ga), (lb, gb) = a, b
    torch.testing.assert_close(lb, la, atol=1e-5, rtol=1e-5)
    assert ga.keys() == gb.keys()
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], atol=1e-5, rtol=1e-4, msg=name)


@needs_inductor
def test_dense_whole_model_compile_matches_eager() -> None:
    cfg, eager, other = _pair("dense-tiny", ["n_layers=2"])
    compiled = torch.compile(other)
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    _assert_match(_loss_and_grads(eager, ids), _loss_and_grads(compiled, ids))


@needs_inductor
def test_rdt_compile_blocks_matches_eager() -> None:
    cfg, eager, other = _pair("rdt-tiny", ["h0=zeros", "checkpoint_loops=true", "loops.bwd_depth=2"])
    other.compile_blocks()
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    for loops in (3, 5):
        _assert_match(_loss_and_grads(eager, ids, num_loops=loops), _loss_and_grads(other, ids, num_loops=loops))
    counts = torch.tensor([2, 4])  # per-sequence loop counts (masked, right-aligned)
    _assert_match(_loss_and_grads(eager, ids, loop_counts=counts), _loss_and_grads(other, ids, loop_counts=counts))


def test_rdt_loop_count_does_not_recompile() -> None:
    from torch._dynamo.testing import CompileCounter

    cfg = load_model_config("rdt-tiny", [*_SMALL, "checkpoint_loops=true"])
    model = mythos.build_model(cfg).train()
    counter = CompileCounter()
    model.compile_blocks(backend=counter)
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    # warm up: T=3 > bwd_depth=2 runs the core both under no_grad and with autograd (one graph each)
    model(ids, ids, num_loops=3).loss.backward()
    first = counter.frame_count
    assert first >= 1
    for loops in (2, 6, 4, 9):
        model(ids, ids, num_loops=loops).loss.backward()
    assert counter.frame_count == first, "a new loop count recompiled the core"


def test_rdt_active_rows_compile_a_small_bounded_set_of_graphs() -> None:
    """Active-row execution calls the core on a varying number of rows (0 .. B). Dynamo's
    automatic dynamic shapes make the batch dimension symbolic after the first change, so the
    graph count levels off (measured: 5 frames for every block here, incl. zero-row ZeRO-3 lockstep
    calls) instead of growing with every new active-row count -- and never reaches the
    recompile limit, past which torch silently falls back to eager."""
    from torch._dynamo.testing import CompileCounter

    cfg = load_model_config("rdt-tiny", [*_SMALL, "checkpoint_loops=true"])
    model = mythos.build_model(cfg).train()
    counter = CompileCounter()
    model.compile_blocks(backend=counter)
    ids = torch.randint(0, cfg.vocab_size, (16, 16))
    seen = []
    for step in range(24):
        counts = sample_loop_counts(cfg.loops, 0, step, 16)
        # n_steps above the max: leading iterations with no active row (ZeRO-3 lockstep)
        model(ids, ids, loop_counts=counts, n_steps=int(counts.max()) + step % 3).loss.backward()
        seen.append(counter.frame_count)
    assert seen[-1] <= 6, seen
    assert seen[-1] < torch._dynamo.config.recompile_limit
    assert seen[8:] == [seen[8]] * len(seen[8:]), seen  # no new graph after the first few steps


def test_rdt_whole_model_compile_traces() -> None:
    """``torch.compile(rdt)`` also works (it unrolls the loop; aot_eager keeps the test fast)."""
    cfg = load_model_config("rdt-tiny", [*_SMALL, "h0=zeros"])
    torch.manual_seed(0)
    model = mythos.build_model(cfg).eval()
    compiled = torch.compile(model, backend="aot_eager")
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids, num_loops=3).logits, model(ids, num_loops=3).logits)
