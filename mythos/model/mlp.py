"""The dense feed-forward network: SwiGLU or ReLU^2.

Its own module so that both the block (:mod:`mythos.model.layers`) and the MoE experts
(:mod:`mythos.model.moe`) can import it without importing each other.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from mythos.model.linear import LoopLinear


class MLP(nn.Module):
    """``swiglu``: down(silu(gate x) * up x); ``relu2``: down(relu(up x)^2)."""

    def __init__(self, d: int, hidden: int, kind: str, lora: tuple[int, int, float] = (0, 0, 16.0)) -> None:
        super().__init__()
        self.kind = kind
        if kind == "swiglu":
            self.gate_proj = LoopLinear(d, hidden, *lora)
        self.up_proj = LoopLinear(d, hidden, *lora)
        self.down_proj = LoopLinear(hidden, d, *lora)

    def forward(self, x: Tensor, loop_idx: int | Tensor | None = None) -> Tensor:
        if self.kind == "swiglu":
            h = F.silu(self.gate_proj(x, loop_idx)) * self.up_proj(x, loop_idx)
        else:
            h = F.relu(self.up_proj(x, loop_idx)).square()
        return self.down_proj(h, loop_idx)
