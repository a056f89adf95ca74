"""``MythosForCausalLM``: an exported mythos model (dense or RDT) as Hugging Face remote code.

``mythos-export --hf`` copies this file and ``configuration_mythos.py`` into the output directory
and names them in ``config.json``'s ``auto_map``, so::

    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)

loads the model with nothing but ``torch`` and ``transformers`` installed (no import of mythos).
It computes what mythos computes in eval mode, op for op, so logits agree to fp32 round-off and
greedy decoding token for token (tested against the training code):

::

    dense: x = Embed(ids); x = Block_i(x) for i < n_layers;            logits = Head(Norm(x))
    rdt:   e = Norm(Prelude(Embed(ids)));  h_0 = 0
           h_{t+1} = Core(Inject(h_t, e) [+ LoopEmbed(t)])  t < num_loops (LoRA adapter t)
           logits = Head(Norm(Coda(C h_T)))          (h_T: the ACT-weighted state with ACT)

Blocks are pre-norm (RMSNorm -> attention with RoPE (rotate-half), GQA, optional parameter-free
QK-norm and a value embedding added to V -> residual; RMSNorm -> SwiGLU or ReLU^2 -> residual);
with ``moe_num_experts > 0`` the RDT core's FFN is a mixture of experts (``MythosMoE``).

**Loops.** ``config.num_loops`` is the default; ``forward(..., num_loops=T)`` and
``generate(..., num_loops=T)`` override it. Keep it fixed while decoding with one cache.

**KV cache** (transformers' ``Cache`` API, a ``DynamicCache``): one cache slot per (iteration,
layer), laid out as prelude ``j -> j``, coda ``j -> n_prelude + j``, core block ``j`` at
iteration ``t -> n_prelude + n_coda + t * n_core + j``. Slot 0 is written by every forward, so
``get_seq_length()`` is the number of cached positions. Slots for loops beyond the config default
are added on first use. As in mythos, decoding with a cache stops looping each row on its own
(``MythosModel._adaptive``) once all its ACT positions halted or (``early_exit_kl > 0``) its
next-token distribution changed by less than ``early_exit_kl`` (KL) between iterations; the
iterations it skipped get, in their slots, its keys/values of its exit iteration, so later tokens
attend at every depth. ``forward(..., exit_kl=, exit_act=)`` asks for the same per-row exit
explicitly (with or without a cache); without a cache and without it, every forward runs all
``num_loops`` iterations.

**Padding** (which mythos never sees): an ``attention_mask`` with zeros masks those keys (every
query may also see itself, so a padding query is never fully masked and nothing is NaN): a
left-padded batch generates what each prompt generates alone (tested). Without zeros in the
mask, attention takes mythos' own path.

Long because the exported directory must be one self-contained file (remote code next to its
config): every block option, the MoE FFN, the three injections, ACT, the KV-cache view and the
per-row adaptive exit live here, mirroring mythos op for op.

Training-time parts of mythos (sampled per-sequence loop counts, truncated backprop, noise
``h_0``) are not part of this file: ``forward`` with ``labels`` runs ``num_loops`` iterations
with full backprop from ``h_0 = 0`` and returns the usual shifted causal-LM loss.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_mythos import MythosConfig

# the output field that carries the cache: ``cache`` in transformers >= 5.2x, ``past_key_values`` before
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

Rope = tuple[Tensor, Tensor]


# ---------------------------------------------------------------------------------------------
# pieces


class MythosRMSNorm(nn.Module):
    """RMSNorm with a learned gain: ``F.rms_norm`` over the last dim."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_tables(position_ids: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> Rope:
    """``cos, sin: [B|1, 1, S, head_dim]`` for ``position_ids [B|1, S]``. Computed in float64 and
    rounded to float32 (then ``dtype``) like mythos' precomputed tables, so the values are the
    same bits; ``sin`` is sign-folded (``cat(-sin_f, sin_f)``) for :func:`apply_rope`."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=position_ids.device) / head_dim))
    ang = position_ids.to(torch.float64)[..., None] * inv  # [B, S, D/2]
    cos = torch.cat([ang.cos(), ang.cos()], dim=-1)
    sin = ang.sin()
    sin = torch.cat([-sin, sin], dim=-1)
    return cos.float().to(dtype)[:, None], sin.float().to(dtype)[:, None]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE on ``x [B, H, S, D]``: ``x cos + rotate_half(x) sin`` written as
    ``x cos + roll(x, D/2) sin_folded`` (the same numbers: ``(-a) b == a (-b)`` in IEEE)."""
    return x * cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * sin


class _CacheView:
    """The model's view of a transformers ``DynamicCache`` for one forward: ``past`` positions
    are cached; ``update(slot, k, v)`` appends this forward's keys/values ``[B, kv_heads, S, D]``
    and returns past + new. ``peek=True``: return past + new without storing (the early-exit
    trial that runs the coda on an intermediate state).

    ``rows`` (None = all; the adaptive exit): the batch rows the call computes. ``update`` then
    takes and returns those rows only; stored, a core slot gets every row: the computed ones
    theirs, the exited ones their newest keys/values of that core layer (``fresh``: those of
    their exit iteration, the fill-in later tokens attend to)."""

    def __init__(self, cache: Cache, past: int, core_base: int = 0, n_core: int = 1) -> None:
        if not isinstance(cache, DynamicCache):
            raise ValueError(f"MythosForCausalLM supports a DynamicCache, got {type(cache).__name__} "
                             "(the RDT's cache grows by loop iteration, a static cache cannot)")
        self.cache, self.past, self.peek = cache, past, False
        self.core_base, self.n_core = core_base, n_core
        self.rows: Tensor | None = None
        self.fresh: dict[int, tuple[Tensor, Tensor]] = {}

    def _layer(self, slot: int) -> DynamicLayer:
        while len(self.cache.layers) <= slot:  # more loops than config.num_hidden_layers planned
            self.cache.layers.append(DynamicLayer())
        return self.cache.layers[slot]

    def update(self, slot: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        layer = self._layer(slot)
        held = layer.get_seq_length()
        if held != self.past:
            raise ValueError(f"KV cache slot {slot} holds {held} positions, the cache {self.past}: it was filled "
                             "with another num_loops; keep num_loops fixed while decoding with one cache")
        rows = self.rows
        if self.peek:
            if held == 0:
                return k, v
            pk, pv = (layer.keys, layer.values) if rows is None else (layer.keys[rows], layer.values[rows])
            return torch.cat([pk, k], dim=-2), torch.cat([pv, v], dim=-2)
        core = slot >= self.core_base
        if core and rows is not None:
            fk, fv = self.fresh[(slot - self.core_base) % self.n_core]
            k, v = fk.index_copy(0, rows, k), fv.index_copy(0, rows, v)
        if core:
            self.fresh[(slot - self.core_base) % self.n_core] = (k, v)
        full_k, full_v = self.cache.update(k, v, slot)
        return (full_k, full_v) if rows is None else (full_k[rows], full_v[rows])

    def last(self, slot: int, n: int) -> tuple[Tensor, Tensor]:
        """The newest ``n`` positions' keys/values of ``slot``."""
        layer = self.cache.layers[slot]
        return layer.keys[..., -n:, :], layer.values[..., -n:, :]


def _take(x: object, keep: Tensor) -> object:
    """Rows ``keep`` (bool over the working rows) of a per-row tensor (first dim = ``keep``'s
    length, at least 2-D), of each element of a tuple; anything else (per-channel ``A_bar``,
    a ``[1, ...]`` rope table, None) as it is."""
    if isinstance(x, tuple):
        return tuple(_take(v, keep) for v in x)
    if isinstance(x, Tensor) and x.dim() >= 2 and x.shape[0] == keep.numel() and keep.numel() > 1:
        return x[keep]
    return x


class MythosLinear(nn.Linear):
    """Bias-free linear with optional depth-wise LoRA: adapter ``i = min(loop_idx, iters - 1)``
    adds ``B_i A_i x * alpha / rank`` (``lora_A [iters, r, in]``, ``lora_B [iters, out, r]``)."""

    def __init__(self, d_in: int, d_out: int, lora: tuple[int, int, float] = (0, 0, 16.0)) -> None:
        super().__init__(d_in, d_out, bias=False)
        rank, iters, alpha = lora
        self.lora_rank = rank
        if rank:
            self.lora_A = nn.Parameter(torch.zeros(iters, rank, d_in))
            self.lora_B = nn.Parameter(torch.zeros(iters, d_out, rank))
            self.lora_scale = alpha / rank

    def forward(self, x: Tensor, loop_idx: int | None = None) -> Tensor:  # type: ignore[override]
        y = F.linear(x, self.weight)
        if not self.lora_rank or loop_idx is None:
            return y
        i = min(loop_idx, self.lora_A.shape[0] - 1)  # later iterations reuse the last adapter
        return y + F.linear(F.linear(x, self.lora_A[i]), self.lora_B[i]) * self.lora_scale


class MythosMLP(nn.Module):
    """``swiglu``: down(silu(gate x) * up x); ``relu2``: down(relu(up x)^2)."""

    def __init__(self, d: int, hidden: int, kind: str, lora: tuple[int, int, float]) -> None:
        super().__init__()
        self.kind = kind
        if kind == "swiglu":
            self.gate_proj = MythosLinear(d, hidden, lora)
        self.up_proj = MythosLinear(d, hidden, lora)
        self.down_proj = MythosLinear(hidden, d, lora)

    def forward(self, x: Tensor, loop_idx: int | None = None) -> Tensor:
        if self.kind == "swiglu":
            h = F.silu(self.gate_proj(x, loop_idx)) * self.up_proj(x, loop_idx)
        else:
            h = F.relu(self.up_proj(x, loop_idx)).square()
        return self.down_proj(h, loop_idx)


class MythosMoE(nn.Module):
    """The core's mixture-of-experts FFN (``moe_num_experts > 0``): a softmax router (fp32) picks
    ``moe_top_k`` experts per token, their outputs are mixed by the renormalised router weights,
    plus ``moe_num_shared`` always-on experts fused into one MLP. Experts carry no LoRA. Tokens
    are dispatched by sorting on expert id, as in training, so the sums run in the same order."""

    def __init__(self, config: MythosConfig) -> None:
        super().__init__()
        d, hidden, kind = config.hidden_size, config.moe_intermediate_size, config.mlp
        self.num_experts, self.top_k = config.moe_num_experts, config.moe_top_k
        self.router = nn.Linear(d, self.num_experts, bias=False)
        self.experts = nn.ModuleList(MythosMLP(d, hidden, kind, (0, 0, 16.0)) for _ in range(self.num_experts))
        n_shared = config.moe_num_shared
        self.shared = MythosMLP(d, hidden * n_shared, kind, (0, 0, 16.0)) if n_shared else None

    def forward(self, x: Tensor, loop_idx: int | None = None) -> Tensor:
        b, s, d = x.shape
        flat = x.reshape(-1, d)
        probs = F.softmax(self.router(flat).float(), dim=-1)  # [N, E]
        weight, expert = probs.topk(self.top_k, dim=-1)  # [N, k]
        weight = (weight / weight.sum(-1, keepdim=True)).to(x.dtype)
        order = expert.flatten().argsort(stable=True)
        counts = torch.bincount(expert.flatten(), minlength=self.num_experts)
        token_of = order // self.top_k
        out = torch.zeros_like(flat)
        start = 0
        for e, n in enumerate(counts.tolist()):
            idx = token_of[start : start + n]
            w = weight.flatten()[order[start : start + n]].unsqueeze(-1)
            out.index_add_(0, idx, self.experts[e](flat[idx]) * w)
            start += n
        if self.shared is not None:
            out = out + self.shared(flat)
        return out.view(b, s, d)


class MythosAttention(nn.Module):
    """Causal attention: GQA, RoPE, optional QK-norm, optional value embedding added to V."""

    def __init__(self, config: MythosConfig, lora: tuple[int, int, float]) -> None:
        super().__init__()
        self.n_heads, self.kv_heads, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                      config.head_dim)
        self.qk_norm = config.qk_norm
        d, kv = config.hidden_size, self.kv_heads * self.head_dim
        self.q_proj = MythosLinear(d, self.n_heads * self.head_dim, lora)
        self.k_proj = MythosLinear(d, kv, lora)
        self.v_proj = MythosLinear(d, kv, lora)
        self.o_proj = MythosLinear(self.n_heads * self.head_dim, d, lora)

    def forward(self, x: Tensor, rope: Rope, mask: Tensor | None, value_embed: Tensor | None,
                loop_idx: int | None, kv: _CacheView | None, slot: int) -> Tensor:
        """``x [B, S, d]``; ``mask [B, 1, S, past + S]`` (bool, True = attend) only with padding."""
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
        if kv is not None:
            past = kv.past
            k, v = kv.update(slot, k, v)
        gqa = self.kv_heads != self.n_heads
        if mask is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        elif past == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        elif s == 1:  # one new token sees every cached one
            y = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        else:  # a chunk after a prefix: causal within the chunk, the whole past
            causal = torch.ones(s, k.shape[2], dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=causal, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(b, s, self.n_heads * self.head_dim), loop_idx)


class MythosBlock(nn.Module):
    """Pre-norm block: ``x + Attn(Norm(x))``, then ``+ MLP(Norm(x))``."""

    def __init__(self, config: MythosConfig, lora_rank: int = 0, moe: bool = False) -> None:
        super().__init__()
        lora = (lora_rank, config.lora_max_iters, config.lora_alpha)
        self.attn_norm = MythosRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = MythosAttention(config, lora)
        self.mlp_norm = MythosRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp: nn.Module = MythosMoE(config) if moe else MythosMLP(
            config.hidden_size, config.intermediate_size, config.mlp, lora)

    def forward(self, x: Tensor, rope: Rope, mask: Tensor | None, value_embed: Tensor | None,
                loop_idx: int | None, kv: _CacheView | None, slot: int) -> Tensor:
        x = x + self.attn(self.attn_norm(x), rope, mask, value_embed, loop_idx, kv, slot)
        return x + self.mlp(self.mlp_norm(x), loop_idx)


# ---------------------------------------------------------------------------------------------
# state injection (RDT)


def _log_softplus(x: Tensor) -> Tensor:
    """log(softplus(x)) without underflow (softplus(x) ~ exp(x) for x << 0)."""
    return torch.where(x < -15.0, x, torch.log(F.softplus(x.clamp(min=-15.0))))


class MythosLTIInjection(nn.Module):
    """``u = A_bar * h + dt * (B e)`` with ``dt = softplus(dt_bias)`` and
    ``A_bar = (1 - eps) * exp(-exp(log dt + A_log))`` in [0, 1): stable for every parameter value."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.A_log = nn.Parameter(torch.zeros(d))
        self.dt_bias = nn.Parameter(torch.zeros(d))
        self.B = nn.Linear(d, d, bias=False)

    def forward(self, e: Tensor) -> tuple[Tensor, Tensor]:
        log_dt = _log_softplus(self.dt_bias.float())
        a = torch.exp(-torch.exp((log_dt + self.A_log.float()).clamp(max=88.0)))
        a_bar = ((1.0 - torch.finfo(e.dtype).eps) * a).to(e.dtype)
        return a_bar, torch.exp(log_dt).to(e.dtype) * self.B(e)

    @staticmethod
    def step(h: Tensor, ctx: tuple[Tensor, Tensor]) -> Tensor:
        a_bar, drive = ctx
        return a_bar * h + drive


class MythosAdditiveInjection(nn.Module):
    """``u = h + e``."""

    def forward(self, e: Tensor) -> Tensor:
        return e

    @staticmethod
    def step(h: Tensor, ctx: Tensor) -> Tensor:
        return h + ctx


class MythosConcatInjection(nn.Module):
    """``u = W [h; e]`` stored as ``h_proj h + e_proj e``."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.h_proj = nn.Linear(d, d, bias=False)
        self.e_proj = nn.Linear(d, d, bias=False)

    def forward(self, e: Tensor) -> Tensor:
        return self.e_proj(e)

    def step(self, h: Tensor, ctx: Tensor) -> Tensor:
        return self.h_proj(h) + ctx


class _ACTState:
    """ACT accumulators for positions ``[B, S]`` (fp32): cumulative halting probability, which
    positions still run, and the halting-weighted output state (remainder rule, forced halt at
    the last iteration)."""

    def __init__(self, h: Tensor) -> None:
        b, s, _ = h.shape
        self.cum = h.new_zeros(b, s, dtype=torch.float32)
        self.running = torch.ones(b, s, dtype=torch.bool, device=h.device)
        self.output = torch.zeros_like(h)

    def update(self, p: Tensor, h_new: Tensor, last: bool, threshold: float) -> Tensor:
        """Fold ``h_new`` in with halting probabilities ``p [B, S]``; returns the positions that
        ran this iteration (the others keep their state)."""
        run = self.running
        halt = run & ((self.cum + p >= threshold) | last)
        cont = run & ~halt
        w = torch.where(halt, 1.0 - self.cum, torch.where(cont, p, torch.zeros_like(p)))
        self.output = self.output + w.unsqueeze(-1).to(h_new.dtype) * h_new
        self.cum = self.cum + torch.where(cont, p, torch.zeros_like(p))
        self.running = self.running & ~halt
        return run


# ---------------------------------------------------------------------------------------------
# models


class MythosPreTrainedModel(PreTrainedModel):
    config_class = MythosConfig
    base_model_prefix = "model"
    _no_split_modules = ["MythosBlock"]
    _supports_sdpa = True
    supports_gradient_checkpointing = False


class MythosModel(MythosPreTrainedModel):
    """Embeddings, the blocks and the final norm; ``forward`` returns normed hidden states
    ``[B, S, d]``. Parameter names are mythos' own (``embed``, ``value_embeds.<layer>``,
    ``layers.<i>`` or ``prelude/core/coda.<i>``, ``injection``, ``readout``, ``loop_embed``,
    ``halt``, ``norm``), so the export is a rename-free copy under ``model.``."""

    def __init__(self, config: MythosConfig) -> None:
        super().__init__(config)
        c = config
        d, kv_dim = c.hidden_size, c.num_key_value_heads * c.head_dim
        self.embed = nn.Embedding(c.vocab_size, d)
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(c.vocab_size, kv_dim) for i in c.value_embed_layers})
        self.is_rdt = c.mythos_kind == "rdt"
        if self.is_rdt:
            self.prelude = nn.ModuleList(MythosBlock(c) for _ in range(c.n_prelude))
            self.prelude_norm = MythosRMSNorm(d, c.rms_norm_eps)
            injections = {"lti": MythosLTIInjection, "concat": MythosConcatInjection}
            self.injection = injections[c.injection](d) if c.injection in injections else MythosAdditiveInjection()
            self.core = nn.ModuleList(MythosBlock(c, c.lora_rank, moe=c.moe_num_experts > 0) for _ in range(c.n_core))
            self.readout = nn.Linear(d, d, bias=False)
            self.coda = nn.ModuleList(MythosBlock(c) for _ in range(c.n_coda))
            self.loop_embed = nn.Embedding(c.loop_embed_size, d) if c.loop_embed else None
            self.halt = nn.Linear(d, 1) if c.act_enabled else None
        else:
            self.layers = nn.ModuleList(MythosBlock(c) for _ in range(c.n_layers))
        self.norm = MythosRMSNorm(d, c.rms_norm_eps)
        self.post_init()

    # ------------------------------------------------------------------ helpers
    def _ve(self, layer: int, input_ids: Tensor) -> Tensor | None:
        key = str(layer)
        return self.value_embeds[key](input_ids) if key in self.value_embeds else None

    def _core_slot(self, t: int, j: int) -> int:
        c = self.config
        return c.n_prelude + c.n_coda + t * c.n_core + j

    @staticmethod
    def _padding_mask(attention_mask: Tensor | None, past: int, s: int) -> Tensor | None:
        """``[B, 1, S, past + S]`` bool (causal and not padding), or None without padding (then
        attention takes mythos' own causal path). A query may always see itself, so a padding
        row is not fully masked (its output is never used)."""
        if attention_mask is None or attention_mask.dim() != 2 or bool(attention_mask.all()):
            return None
        keys = attention_mask[:, -(past + s):].bool()
        mask = torch.ones(s, past + s, dtype=torch.bool, device=keys.device).tril(diagonal=past)[None] & keys[:, None]
        rows = torch.arange(s, device=keys.device)
        mask[:, rows, rows + past] = True
        return mask[:, None]

    def _finish(self, h: Tensor, input_ids: Tensor, rope: Rope, mask: Tensor | None, kv: _CacheView | None) -> Tensor:
        """Readout and coda (RDT): ``[B, S, d] -> [B, S, d]`` (before the final norm)."""
        c = self.config
        y = self.readout(h)
        for j, block in enumerate(self.coda):
            y = block(y, rope, mask, self._ve(c.n_prelude + c.n_core + j, input_ids), None, kv, c.n_prelude + j)
        return y

    def _iterate(self, h: Tensor, ctx: object, t: int, rope: Rope, mask: Tensor | None,
                 ve_core: list[Tensor | None], kv: _CacheView | None) -> Tensor:
        """One loop iteration ``t``: inject (plus the loop embedding), then the core blocks."""
        u = self.injection.step(h, ctx)
        if self.loop_embed is not None:
            u = u + self.loop_embed(torch.tensor(min(t, self.loop_embed.num_embeddings - 1), device=u.device))
        lora_idx = t if self.config.lora_rank else None
        for j, block in enumerate(self.core):
            u = block(u, rope, mask, ve_core[j], lora_idx, kv, self._core_slot(t, j))
        return u

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                cache: Cache | None = None, num_loops: int | None = None,
                head: Callable[[Tensor], Tensor] | None = None, exit_kl: float | None = None,
                exit_act: bool | None = None) -> Tensor:
        """``input_ids [B, S]`` -> normed hidden states ``[B, S, d]``. ``attention_mask [B, past + S]``
        (1 = token, 0 = padding), ``position_ids [B|1, S]`` (default: ``past + arange(S)``),
        ``cache``: a ``DynamicCache`` (appended to). ``head`` maps normed states to logits, for
        the KL exit. ``exit_kl`` / ``exit_act``: the per-row adaptive exit (see
        :meth:`_adaptive`); defaults: ``config.early_exit_kl`` and ACT with a cache, none without."""
        c = self.config
        b, s = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        kv = _CacheView(cache, past, c.n_prelude + c.n_coda, max(c.n_core, 1)) if cache is not None else None
        if position_ids is None:
            position_ids = torch.arange(past, past + s, device=input_ids.device)[None]
        x = self.embed(input_ids)
        rope = rope_tables(position_ids, c.head_dim, c.rope_theta, x.dtype)
        mask = self._padding_mask(attention_mask, past, s)

        if not self.is_rdt:
            if num_loops is not None:
                raise ValueError("num_loops is an RDT option; this is a dense model")
            for i, block in enumerate(self.layers):
                x = block(x, rope, mask, self._ve(i, input_ids), None, kv, i)
            return self.norm(x)

        n = int(num_loops if num_loops is not None else c.num_loops)
        if n < 1:
            raise ValueError(f"num_loops must be >= 1, got {n}")
        for j, block in enumerate(self.prelude):
            x = block(x, rope, mask, self._ve(j, input_ids), None, kv, j)
        e = self.prelude_norm(x)
        ctx = self.injection(e)
        ve_core = [self._ve(c.n_prelude + j, input_ids) for j in range(c.n_core)]
        h = torch.zeros_like(e)  # eval-mode initial state (mythos' noise mean)
        kl_thr = (c.early_exit_kl if kv is not None else 0.0) if exit_kl is None else float(exit_kl)
        act_exit = (self.halt is not None and kv is not None) if exit_act is None else bool(exit_act)
        if kl_thr < 0:
            raise ValueError(f"exit_kl must be >= 0, got {kl_thr}")
        if act_exit and self.halt is None:
            raise ValueError("exit_act needs an ACT model (config.act_enabled=false)")
        if kl_thr > 0 and head is None:
            raise ValueError("the KL exit reads the next-token distribution: call MythosForCausalLM")
        if kl_thr > 0 or act_exit:
            return self._adaptive(h, e, ctx, ve_core, input_ids, rope, mask, kv, n, kl_thr, act_exit, head)
        act = _ACTState(h) if self.halt is not None else None
        for t in range(n):
            h_new = self._iterate(h, ctx, t, rope, mask, ve_core, kv)
            if act is not None:
                p = torch.sigmoid(self.halt(h_new).squeeze(-1).float())
                ran = act.update(p, h_new, t == n - 1, c.act_threshold)
                h = torch.where(ran.unsqueeze(-1), h_new, h)
            else:
                h = h_new
        self.exit_loops = torch.full((b,), n, dtype=torch.long)
        if act is not None:
            h = act.output
        return self.norm(self._finish(h, input_ids, rope, mask, kv))

    def _adaptive(self, h: Tensor, e: Tensor, ctx: object, ve_core: list[Tensor | None], input_ids: Tensor,
                  rope: Rope, mask: Tensor | None, kv: _CacheView | None, n: int, exit_kl: float, exit_act: bool,
                  head: Callable[[Tensor], Tensor] | None) -> Tensor:
        """Per-row adaptive depth, at most ``n`` iterations (mythos' ``RDT._trunk_adaptive``):
        row i stops after iteration ``T_i`` when ``T_i >= 2`` and KL(p_T || p_T-1) < ``exit_kl``
        for the last position's next-token distribution ``p_t`` (what ``num_loops = t`` would
        output), or (``exit_act``) every position of the row has halted, or ``T_i = n``. An
        exited row leaves the working batch (its later iterations are not computed) and outputs
        its state at ``T_i``: without a cache, its logits are those of ``num_loops = T_i``. With a
        cache, its skipped iterations' slots get its keys/values of iteration ``T_i`` (the
        fill-in), so a batch decodes each row as that row decoded alone. ``self.exit_loops [B]``
        keeps each row's ``T_i`` of the last forward (core row-iterations: their sum)."""
        c = self.config
        b = h.shape[0]
        act = _ACTState(h) if self.halt is not None else None
        idx = torch.arange(b, device=h.device)
        ids, w_rope, w_mask = input_ids, rope, mask
        out = torch.empty_like(h)
        exit_t = torch.full((b,), n, dtype=torch.long)
        prev: Tensor | None = None
        ran = n
        for t in range(n):
            if kv is not None:
                kv.rows = None if idx.numel() == b else idx
            h_new = self._iterate(h, ctx, t, w_rope, w_mask, ve_core, kv)
            last = t == n - 1
            if act is not None:
                p = torch.sigmoid(self.halt(h_new).squeeze(-1).float())
                run = act.update(p, h_new, last, c.act_threshold)
                h = torch.where(run.unsqueeze(-1), h_new, h)
                left = torch.where(act.running, 1.0 - act.cum, torch.zeros_like(act.cum))
                state = act.output + left.unsqueeze(-1).to(h_new.dtype) * h_new  # the output were t the last
            else:
                h = state = h_new
            done = torch.full((idx.numel(),), last, dtype=torch.bool, device=h.device)
            if not last and exit_act and act is not None:
                done |= ~act.running.any(-1)
            if not last and exit_kl > 0 and head is not None:
                if kv is not None:
                    kv.peek = True
                y = self.norm(self._finish(state, ids, w_rope, w_mask, kv))[:, -1]
                if kv is not None:
                    kv.peek = False
                logp = F.log_softmax(head(y).float(), -1)
                if prev is not None:
                    done |= F.kl_div(prev, logp, log_target=True, reduction="none").sum(-1) < exit_kl
                prev = logp
            if not bool(done.any()):
                continue
            gone = idx[done]
            out[gone] = state[done]
            exit_t[gone.cpu()] = t + 1
            if bool(done.all()):
                ran = t + 1
                break
            keep = ~done
            idx, h, ids, prev = idx[keep], h[keep], ids[keep], None if prev is None else prev[keep]
            ctx, w_rope, w_mask = _take(ctx, keep), _take(w_rope, keep), _take(w_mask, keep)
            ve_core = [_take(v, keep) for v in ve_core]
            if act is not None:
                act.cum, act.running, act.output = act.cum[keep], act.running[keep], act.output[keep]
        if kv is not None:
            kv.rows = None
            s = input_ids.shape[1]
            for later in range(ran, n):  # nobody ran these: every row's newest keys/values (its exit iteration)
                for j in range(c.n_core):
                    kv.update(self._core_slot(later, j), *kv.last(self._core_slot(ran - 1, j), s))
        self.exit_loops = exit_t
        return self.norm(self._finish(out, input_ids, rope, mask, kv))


class MythosForCausalLM(MythosPreTrainedModel, GenerationMixin):
    """Causal LM head on :class:`MythosModel` (tied to the token embedding unless
    ``tie_word_embeddings`` is false, then ``lm_head``)."""

    def __init__(self, config: MythosConfig) -> None:
        super().__init__(config)
        self.model = MythosModel(config)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size,
                                                                         bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed = value

    def get_output_embeddings(self) -> nn.Module | None:
        return self.lm_head

    def _logits(self, h: Tensor) -> Tensor:
        """Normed states ``[..., d]`` -> logits ``[..., vocab]``."""
        return F.linear(h, self.model.embed.weight) if self.lm_head is None else self.lm_head(h)

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: Cache | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        num_loops: int | None = None,
        exit_kl: float | None = None,
        exit_act: bool | None = None,
        logits_to_keep: int | Tensor = 0,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """``input_ids [B, S]`` -> ``logits [B, S, vocab]`` (the last ``logits_to_keep`` positions
        when > 0). ``num_loops``: RDT iterations (default ``config.num_loops``). ``cache`` (or the
        older name ``past_key_values``): a ``DynamicCache`` to extend; ``use_cache=True`` without
        one starts a new cache (returned in the output). ``labels [B, S]`` (unshifted, -100
        ignored): mean next-token cross-entropy as ``loss``. ``exit_kl`` / ``exit_act``: per-row
        adaptive depth with ``num_loops`` as the cap (``MythosModel._adaptive``; the rows' loop
        counts of the last forward are ``self.model.exit_loops``)."""
        if input_ids is None:
            raise ValueError("MythosForCausalLM needs input_ids (value embeddings are indexed by token)")
        cache = cache if cache is not None else past_key_values
        if cache is None and use_cache:
            cache = DynamicCache()
        h = self.model(input_ids, attention_mask, position_ids, cache, num_loops, head=self._logits,
                       exit_kl=exit_kl, exit_act=exit_act)
        if isinstance(logits_to_keep, int):
            h = h[:, -logits_to_keep:] if logits_to_keep > 0 else h
        else:
            h = h[:, logits_to_keep]
        logits = self._logits(h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache})
