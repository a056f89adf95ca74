"""Building blocks shared by the dense baseline and the RDT.

Pre-norm decoder block = RMSNorm -> causal attention (RoPE, MHA/GQA, optional QK-norm and value
embeddings) -> residual, RMSNorm -> MLP (SwiGLU or ReLU^2, or an MoE) -> residual.

The FFNs live in :mod:`mythos.model.mlp` and :mod:`mythos.model.moe`, and the LoRA-capable
projection both they and attention use in :mod:`mythos.model.linear`, so imports run one way:
``linear -> mlp -> moe -> layers``.

Conventions: activations are ``[batch, seq, d_model]``; per-head tensors ``[batch, heads, seq,
head_dim]``. RoPE uses the "rotate half" layout of Hugging Face Llama so dense weights export
one-to-one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mythos.model.config import ModelConfig
from mythos.model.linear import LoopLinear
from mythos.model.mlp import MLP
from mythos.model.moe import MoE

_EXACT_DTYPES = (torch.float32, torch.float64)


class _RMSNormFn(torch.autograd.Function):
    """``F.rms_norm(x, (d,), w, eps)`` with a hand-written backward, for CPU.

    On CPU ``F.rms_norm`` is a composite of ``pow, mean, add, rsqrt, mul, mul``: autograd saves
    three ``[.., d]`` tensors (``x``, ``x * r``, and ``r``) and runs ~13 elementwise ops backward.
    Here the forward runs the *same* ops in the same order (bitwise-identical output), saves only
    ``x`` and ``r``, and the backward is the closed form ``dx = r * (g w - n * mean(g w * n))``,
    ``dw = sum(g * n)`` with ``n = x r``: ~25% less time fwd+bwd and one activation fewer per norm
    (measured, see docs/benchmarks.md). Used for fp32/fp64 on CPU only: on CUDA ``F.rms_norm`` has
    a fused kernel, and for bf16/fp16 the composite's internal rounding is not reproduced here."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:  # type: ignore[override]
        r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(eps))
        ctx.save_for_backward(x, r, weight)
        return x.mul(r).mul(weight)

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor | None, Tensor | None, None]:  # type: ignore[override]
        x, r, weight = ctx.saved_tensors
        n = x * r
        gw = (g * n).sum(dim=tuple(range(g.dim() - 1))) if ctx.needs_input_grad[1] else None
        gx = None
        if ctx.needs_input_grad[0]:
            gn = g * weight
            gx = (gn - n * (gn * n).mean(-1, keepdim=True)).mul_(r)
        return gx, gw, None


class RMSNorm(nn.Module):
    """RMSNorm with a learned gain (Llama): ``F.rms_norm`` (a fused kernel on CUDA), and on CPU
    the same forward with a cheaper hand-written backward (:class:`_RMSNormFn`)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type == "cpu" and x.dtype in _EXACT_DTYPES and torch.is_grad_enabled():
            return _RMSNormFn.apply(x, self.weight, self.eps)
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    """Precomputed RoPE tables ``cos, sin: [max_seq_len, head_dim]`` (rotate-half layout).

    The tables are real-valued, non-persistent buffers computed once in float64. ``model.to(bf16)``
    rounds them exactly as casting per step would, and nothing is recomputed per forward.

    ``sin`` is stored *sign-folded* for :func:`apply_rope`: ``cat(-sin_f, sin_f)`` instead of
    Llama's ``cat(sin_f, sin_f)``, so the rotation needs no negation (see there).
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.max_seq_len, self.theta = head_dim, max_seq_len, theta
        cos, sin = self._tables(torch.device("cpu") if not _meta_default() else torch.device("meta"))
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _tables(self, device: torch.device) -> tuple[Tensor, Tensor]:
        if device.type == "meta":
            shape = (self.max_seq_len, self.head_dim)
            return torch.empty(shape, device=device), torch.empty(shape, device=device)
        inv = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim))
        ang = torch.outer(torch.arange(self.max_seq_len, dtype=torch.float64), inv)
        sin = ang.sin()
        cos, sin = torch.cat([ang.cos(), ang.cos()], dim=-1), torch.cat([-sin, sin], dim=-1)
        return cos.float().to(device), sin.float().to(device)

    def reset_tables(self) -> None:
        """Recompute the tables in place (after materialising a meta-device model)."""
        cos, sin = self._tables(self.cos.device)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def forward(self, start: int, length: int) -> tuple[Tensor, Tensor]:
        if start + length > self.max_seq_len:
            raise ValueError(
                f"position {start + length} exceeds max_seq_len={self.max_seq_len}; raise model.max_seq_len"
            )
        return self.cos[start : start + length], self.sin[start : start + length]


def _meta_default() -> bool:
    return torch.empty(0).device.type == "meta"


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: ``[B, H, S, D]``; cos and the sign-folded sin (``cat(-sin_f, sin_f)``): ``[S, D]``.

    Llama's rotate-half ``x * cos + cat(-x2, x1) * cat(sin_f, sin_f)`` computed as
    ``x * cos + roll(x, D/2) * cat(-sin_f, sin_f)``. Bitwise the same result (``(-a) * b ==
    a * (-b)`` exactly in IEEE arithmetic), one elementwise op fewer forward and backward (no
    ``neg``, and ``roll`` replaces slice+slice+cat): ~20% less time in RoPE on CPU (measured
    fwd+bwd on ``[8, 8, 256, 64]``; see docs/benchmarks.md)."""
    return x * cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * sin


@dataclass
class KVCache:
    """Per-(iteration, layer) key/value cache for incremental decoding.

    ``store[key] = (k, v)`` with ``k, v: [B, kv_heads, S_past, head_dim]``; ``key`` is
    ``(iteration, layer)`` (iteration -1 for blocks outside the loop). ``pos`` is the number of
    positions already cached; it advances once per model forward, not per layer.
    """

    store: dict[tuple[int, int], tuple[Tensor, Tensor]] = field(default_factory=dict)
    pos: int = 0
    peek: bool = False
    """When True, ``update`` returns past+new without storing (a trial forward, e.g. the RDT's
    early-exit check that runs the coda on an intermediate state)."""

    def update(self, key: tuple[int, int], k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if key in self.store:
            pk, pv = self.store[key]
            k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
        if not self.peek:
            self.store[key] = (k, v)
        return k, v


class Attention(nn.Module):
    """Causal multi-head attention with GQA, RoPE, optional QK-norm and value embeddings."""

    def __init__(self, cfg: ModelConfig, lora_rank: int = 0) -> None:
        super().__init__()
        self.n_heads, self.kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.qk_norm = cfg.qk_norm
        d, kv = cfg.d_model, cfg.kv_heads * cfg.head_dim
        lora = (lora_rank, cfg.lora.max_iters, cfg.lora.alpha)
        self.q_proj = LoopLinear(d, d, *lora)
        self.k_proj = LoopLinear(d, kv, *lora)
        self.v_proj = LoopLinear(d, kv, *lora)
        self.o_proj = LoopLinear(d, d, *lora)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        *,
        value_embed: Tensor | None = None,
        loop_idx: int | Tensor | None = None,
        cache: KVCache | None = None,
        cache_key: tuple[int, int] | None = None,
    ) -> Tensor:
        b, s, _ = x.shape
        q = self.q_proj(x, loop_idx).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x, loop_idx).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x, loop_idx)
        if value_embed is not None:
            v = v + value_embed
        v = v.view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            q = F.rms_norm(q, (self.head_dim,))
            k = F.rms_norm(k, (self.head_dim,))
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        past = 0
        if cache is not None:
            assert cache_key is not None
            past = cache.pos
            k, v = cache.update(cache_key, k, v)
        gqa = self.kv_heads != self.n_heads
        if past == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        elif s == 1:
            y = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)  # one new token sees all
        else:  # a chunk after a prefix: causal within the chunk, full view of the past
            mask = torch.ones(s, k.shape[2], dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(b, s, self.n_heads * self.head_dim)
        return self.o_proj(y, loop_idx)


class Block(nn.Module):
    """Pre-norm transformer block. ``forward`` returns ``(x, aux_loss)``; ``aux_loss`` is the MoE
    load-balancing loss of this block (None without MoE), returned rather than stashed so it stays
    correct under activation checkpointing."""

    def __init__(self, cfg: ModelConfig, *, in_core: bool = False) -> None:
        super().__init__()
        lora_rank = cfg.lora.rank if in_core else 0
        lora = (lora_rank, cfg.lora.max_iters, cfg.lora.alpha)
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, lora_rank)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        if in_core and cfg.moe.enabled:
            self.mlp: nn.Module = MoE(cfg)
        else:
            self.mlp = MLP(cfg.d_model, cfg.ffn_hidden, cfg.mlp, lora)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        *,
        value_embed: Tensor | None = None,
        loop_idx: int | Tensor | None = None,
        cache: KVCache | None = None,
        cache_key: tuple[int, int] | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        x = x + self.attn(
            self.attn_norm(x), rope, value_embed=value_embed, loop_idx=loop_idx, cache=cache, cache_key=cache_key
        )
        out = self.mlp(self.mlp_norm(x), loop_idx)
        if isinstance(out, tuple):
            out, aux = out
            return x + out, aux
        return x + out, None


def init_weights(module: nn.Module, cfg: ModelConfig) -> None:
    """Normal(0, init_std) for projections and embeddings; output projections zero when
    ``zero_init_out`` (Parcae); RMSNorm gains one. LoRA A/B keep their own init."""
    for name, p in module.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("lora_A", "lora_B") or name.endswith("norm.weight") or p.dim() < 2:
            continue
        if cfg.zero_init_out and (name.endswith("o_proj.weight") or name.endswith("down_proj.weight")):
            nn.init.zeros_(p)
        else:
            nn.init.normal_(p, std=cfg.init_std)
