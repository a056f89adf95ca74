"""The LM loss head without a ``[tokens, vocab]`` logits tensor: fused linear + cross-entropy.

``F.cross_entropy(F.linear(h, W).float(), y)`` keeps the fp32 logits ``[N, V]`` (and their bf16
copy) alive for backward: at a 32768 vocab and a micro-batch of 8 x 2048 tokens that is 2 GiB of
fp32 logits alone, the largest activation of the step. :func:`linear_cross_entropy` instead walks
the tokens in chunks; for each chunk it computes the logits, the loss, and -- when a gradient is
needed -- the gradients with respect to ``h`` and ``W`` right away (the softmax minus the one-hot
target, as autograd would), then frees the chunk. Backward only scales the stored gradients by
the incoming one. Nothing is recomputed: the FLOPs are those of the unfused head (``2 N V d``
forward, ``4 N V d`` backward), but the ``4 N V d`` run during the forward pass.

Held for backward: ``grad_h [N, d]`` (the size of ``h``) and ``grad_W [V, d]`` in fp32.
Arithmetic mirrors the unfused path: logits in the input dtype, softmax / loss in fp32, the
gradient cast to the input dtype before its two matmuls. Each chunk's ``grad_W`` product is
rounded to the input dtype (as the unfused matmul rounds its single product) and the chunks are
summed in fp32; in fp32 the result equals the unfused one to round-off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

#: Label value ignored by the loss (``F.cross_entropy``'s default ``ignore_index``).
IGNORE_INDEX = -100

#: Logit elements per chunk (fp32): 2^24 = 64 MiB, e.g. 512 tokens at a 32768 vocab (a [512, d] x
#: [d, 32768] matmul is still large enough to run at full speed on a GPU).
CHUNK_ELEMENTS = 1 << 24


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, labels: Tensor, chunk: int) -> Tensor:  # type: ignore[override]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for s in range(0, h.shape[0], chunk):
            hc, yc = h[s : s + chunk], labels[s : s + chunk]
            logits = F.linear(hc, weight).float()  # [c, V]
            valid = (yc != IGNORE_INDEX).unsqueeze(1)
            target = yc.clamp(min=0).unsqueeze(1)
            lse = torch.logsumexp(logits, dim=-1, keepdim=True)
            total += ((lse - logits.gather(1, target)) * valid).sum()
            if need_h or need_w:
                g = logits.sub_(lse).exp_()  # softmax, in place of the logits
                g.scatter_add_(1, target, -valid.float())  # minus the one-hot target
                g = g.mul_(valid).to(h.dtype)  # ignored tokens: no gradient
                if need_h:
                    grad_h[s : s + chunk] = g @ weight
                if need_w:
                    grad_w += (g.t() @ hc).float()
        ctx.grads, ctx.weight_dtype = (grad_h, grad_w), weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:  # type: ignore[override]
        grad_h, grad_w = ctx.grads
        ctx.grads = None
        gh = None if grad_h is None else grad_h * grad_out.to(grad_h.dtype)
        gw = None if grad_w is None else grad_w.mul_(grad_out.float()).to(ctx.weight_dtype)
        return gh, gw, None, None


def linear_cross_entropy(h: Tensor, weight: Tensor, labels: Tensor, chunk_elements: int = CHUNK_ELEMENTS) -> Tensor:
    """``sum`` of token cross-entropies (fp32 scalar) of ``logits = h @ weight.T`` against ``labels``
    (``IGNORE_INDEX`` skipped), without materialising the logits. ``h [..., d]``, ``labels [...]``,
    ``weight [V, d]``."""
    chunk = max(1, chunk_elements // weight.shape[0])
    return _LinearCrossEntropy.apply(h.reshape(-1, h.shape[-1]), weight, labels.reshape(-1), chunk)
