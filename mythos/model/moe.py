"""Mixture-of-experts FFN for the RDT core: routed top-k experts plus always-on shared experts.

Tokens are dispatched by sorting on expert id (no capacity limit, so no token is dropped) and
every expert is called every forward, possibly on zero tokens: ZeRO-3 gathers parameters on
module entry, so a data-dependent set of called modules would make ranks diverge and thrash its
prefetch trace.

Host sync: the per-expert token counts decide the dispatch slices (``counts.tolist()``), one
device-to-host copy per MoE call on GPU -- the one sync the RDT's hot path has with MoE enabled
(off by default). A capacity-based dispatch (fixed slice sizes, dropped tokens) would avoid it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mythos.model.config import ModelConfig
from mythos.model.mlp import MLP


class MoE(nn.Module):
    """``forward(x [B,S,d]) -> (y [B,S,d], balance_loss scalar)``.

    Balance loss (Switch Transformer): ``E * sum_e f_e * P_e`` with ``f_e`` the fraction of
    routed assignments to expert e and ``P_e`` its mean router probability; it is 1.0 when the
    load is perfectly uniform. ``last_load`` holds the detached ``f`` for metrics.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        m = cfg.moe
        hidden = m.expert_hidden or max(cfg.ffn_hidden // m.top_k, 1)
        self.num_experts, self.top_k = m.num_experts, m.top_k
        self.router = nn.Linear(cfg.d_model, m.num_experts, bias=False)
        self.experts = nn.ModuleList(MLP(cfg.d_model, hidden, cfg.mlp) for _ in range(m.num_experts))
        self.shared = MLP(cfg.d_model, hidden * m.num_shared, cfg.mlp) if m.num_shared else None
        self.register_buffer("last_load", torch.zeros(m.num_experts), persistent=False)

    def forward(self, x: Tensor, loop_idx: int | Tensor | None = None) -> tuple[Tensor, Tensor]:
        b, s, d = x.shape
        flat = x.reshape(-1, d)
        probs = F.softmax(self.router(flat).float(), dim=-1)  # [N, E], routing in fp32
        weight, expert = probs.topk(self.top_k, dim=-1)  # [N, k]
        weight = (weight / weight.sum(-1, keepdim=True)).to(x.dtype)

        order = expert.flatten().argsort(stable=True)
        counts = torch.bincount(expert.flatten(), minlength=self.num_experts)
        token_of = order // self.top_k  # which token each sorted assignment belongs to
        out = torch.zeros_like(flat)
        start = 0
        for e, n in enumerate(counts.tolist()):
            idx = token_of[start : start + n]
            y = self.experts[e](flat[idx])
            w = weight.flatten()[order[start : start + n]].unsqueeze(-1)
            out.index_add_(0, idx, y * w)
            start += n
        if self.shared is not None:
            out = out + self.shared(flat)

        frac = counts.float() / max(expert.numel(), 1)
        # sum / max(N, 1), not mean: the RDT may call the core on zero rows (ZeRO-3 lockstep)
        balance = self.num_experts * (frac * probs.sum(0) / max(flat.shape[0], 1)).sum()
        self.last_load.copy_(frac.detach())
        return out.view(b, s, d), balance
