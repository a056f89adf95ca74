"""The fused linear + cross-entropy head (mythos.model.loss): the loss and gradients of the unfused
``F.cross_entropy(F.linear(h, W).float())`` to fp32 round-off, without a ``[tokens, vocab]``
tensor kept for backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mythos
from mythos.model.config import ModelConfig
from mythos.model.loss import IGNORE_INDEX, linear_cross_entropy


def _inputs(n: int = 37, d: int = 16, v: int = 50, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, d, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(v, d, generator=g) * 0.3).to(dtype).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g)
    y[::5] = IGNORE_INDEX
    return h, w, y


def _reference(h, w, y):
    return F.cross_entropy(F.linear(h, w).float(), y, ignore_index=IGNORE_INDEX, reduction="sum")


@pytest.mark.parametrize("chunk_rows", [1, 7, 37, 1000])
def test_fused_matches_unfused_loss_and_gradients(chunk_rows: int) -> None:
    h, w, y = _inputs()
    ref = _reference(h, w, y)
    (ref * 0.37).backward()  # a non-unit incoming gradient, as the trainer's token scale gives
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    out = linear_cross_entropy(h, w, y, chunk_elements=chunk_rows * w.shape[0])
    (out * 0.37).backward()
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(h.grad, gh, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(w.grad, gw, rtol=1e-5, atol=1e-7)


def test_fused_bf16_errors_match_unfused() -> None:
    """bf16 inputs: against an fp64 computation from the same bf16 values, the fused head's errors
    are of the unfused head's size (loss and grad h the same arithmetic; grad W rounds each chunk's
    product to bf16, as the unfused matmul rounds its one product, and sums chunks in fp32)."""
    h, w, y = _inputs(n=200, dtype=torch.bfloat16)
    truth_h, truth_w = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    truth = F.cross_entropy(F.linear(truth_h, truth_w), y, ignore_index=IGNORE_INDEX, reduction="sum")
    truth.backward()
    ref = _reference(h, w, y)
    ref.backward()
    errs = {"unfused": (ref, h.grad.clone(), w.grad.clone())}
    h.grad = w.grad = None
    out = linear_cross_entropy(h, w, y, chunk_elements=64 * w.shape[0])
    out.backward()
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    errs["fused"] = (out, h.grad, w.grad)
    exact = (truth, truth_h.grad, truth_w.grad)
    err = {k: [float((a.detach().double() - b.detach()).abs().max()) for a, b in zip(v, exact)]
           for k, v in errs.items()}
    for i, what in enumerate(("loss", "grad h", "grad W")):
        assert err["fused"][i] <= 2.0 * err["unfused"][i] + 1e-6, (what, err)


def test_all_ignored_gives_zero_loss_and_gradient() -> None:
    h, w, y = _inputs()
    out = linear_cross_entropy(h, w, torch.full_like(y, IGNORE_INDEX))
    out.backward()
    assert out.item() == 0.0 and not h.grad.any() and not w.grad.any()


def _saved_numels(fn) -> list[int]:
    sizes: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sizes


@pytest.mark.parametrize("tie", [True, False])
def test_model_loss_head_holds_no_logits_and_matches_unfused(tie: bool) -> None:
    """Through the model (tied embedding head and untied LMHead): the fused path (the default with
    labels) gives the unfused path's loss and gradients, and autograd holds no [B*S, vocab] tensor."""
    cfg = ModelConfig(kind="dense", vocab_size=512, d_model=32, n_heads=2, n_layers=1, max_seq_len=64,
                      tie_embeddings=tie, zero_init_out=False)
    torch.manual_seed(0)
    model = mythos.build_model(cfg)
    ids = torch.randint(0, 512, (4, 48), generator=torch.Generator().manual_seed(1))
    labels = ids.roll(-1, 1)
    labels[:, -1] = IGNORE_INDEX
    results = {}
    for fused in (True, False):
        model.zero_grad()
        outs = []
        saved = _saved_numels(lambda f=fused, o=outs: o.append(model(ids, labels=labels, return_logits=not f)))
        out = outs[0]
        out.loss.backward()
        results[fused] = (out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, saved)
    logits_numel = 4 * 48 * 512
    assert max(results[True][2]) < logits_numel <= max(results[False][2])
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-6, atol=1e-6)
    for name, g in results[False][1].items():
        torch.testing.assert_close(results[True][1][name], g, rtol=1e-5, atol=1e-7, msg=name)
