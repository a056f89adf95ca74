"""Bias-free linear projection with optional depth-wise LoRA (one adapter per loop iteration).

Its own module because attention (:mod:`mythos.model.layers`) and the FFNs
(:mod:`mythos.model.mlp`, :mod:`mythos.model.moe`) all build on it, and the FFNs must not import
the block that uses them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LoopLinear(nn.Linear):
    """``nn.Linear`` (no bias) with optional depth-wise LoRA: one rank-r adapter per loop index.

    ``forward(x, loop_idx)``: ``loop_idx`` is None (no adapter), an int (same iteration for the
    whole batch) or a LongTensor ``[batch]`` (per-sequence iteration, as when sequences run
    different loop counts). Indices past ``n_iters - 1`` reuse the last adapter, so inference can
    run more loops than training. ``lora_B`` starts at zero: at init every iteration computes the
    same function, and training makes them distinct.
    """

    def __init__(self, d_in: int, d_out: int, lora_rank: int = 0, lora_iters: int = 0, alpha: float = 16.0):
        super().__init__(d_in, d_out, bias=False)
        self.lora_rank = lora_rank
        if lora_rank:
            self.lora_A = nn.Parameter(torch.empty(lora_iters, lora_rank, d_in))
            self.lora_B = nn.Parameter(torch.zeros(lora_iters, d_out, lora_rank))
            self.lora_scale = alpha / lora_rank
            nn.init.normal_(self.lora_A, std=1.0 / math.sqrt(d_in))

    def forward(self, x: Tensor, loop_idx: int | Tensor | None = None) -> Tensor:  # type: ignore[override]
        y = F.linear(x, self.weight)
        if not self.lora_rank or loop_idx is None:
            return y
        last = self.lora_A.shape[0] - 1
        if isinstance(loop_idx, int):
            i = min(loop_idx, last)
            return y + F.linear(F.linear(x, self.lora_A[i]), self.lora_B[i]) * self.lora_scale
        idx = loop_idx.clamp(max=last)
        a, b = self.lora_A[idx], self.lora_B[idx]  # [B, r, in], [B, out, r]
        low = torch.einsum("bsi,bri->bsr", x, a)
        return y + torch.einsum("bsr,bor->bso", low, b) * self.lora_scale
