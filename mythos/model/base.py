"""What the dense baseline and the RDT share: token/value embeddings, the head, the loss,
parameter classification for the optimiser, and ``generate()``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mythos.model.config import ModelConfig
from mythos.model.layers import Block, KVCache, RMSNorm, RotaryEmbedding
from mythos.model.loss import IGNORE_INDEX, linear_cross_entropy

ParamKind = Literal["matrix", "embedding", "vector", "lti"]


@dataclass
class ModelOutput:
    """``logits: [B, S, vocab]`` (None when labels were given without ``return_logits``: the
    loss head then never materialises them). With labels: ``ce_sum`` (sum of token losses, fp32),
    ``n_tokens`` (labels != -100), ``loss`` = mean CE + weighted auxiliary losses (what a
    single-batch step minimises). ``aux`` holds detached scalars for metrics (loops, ACT, MoE, rho)."""

    logits: Tensor | None
    loss: Tensor | None = None
    ce_sum: Tensor | None = None
    n_tokens: Tensor | None = None
    aux_loss: Tensor | None = None
    aux: dict[str, Tensor] = field(default_factory=dict)


class TokenEmbedding(nn.Embedding):
    """Token embedding that also serves as the tied output head: ``embed(ids)`` looks up
    ``[B, S] -> [B, S, d]``; ``embed(h, as_head=True)`` projects ``[B, S, d] -> [B, S, vocab]``,
    and with ``labels`` returns the summed cross-entropy instead (fused, no logits tensor).
    Going through ``forward`` every time matters under ZeRO-3, which gathers a partitioned weight
    only inside its owning module's forward."""

    def forward(self, x: Tensor, as_head: bool = False, labels: Tensor | None = None) -> Tensor:  # type: ignore[override]
        if not as_head:
            return super().forward(x)
        return F.linear(x, self.weight) if labels is None else linear_cross_entropy(x, self.weight, labels)


class LMHead(nn.Linear):
    """Untied output head (``nn.Linear`` without bias, same state-dict keys); with ``labels`` it
    returns the summed cross-entropy without materialising logits (see :mod:`mythos.model.loss`)."""

    def __init__(self, d: int, vocab: int) -> None:
        super().__init__(d, vocab, bias=False)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:  # type: ignore[override]
        return F.linear(x, self.weight) if labels is None else linear_cross_entropy(x, self.weight, labels)


class CausalLM(nn.Module):
    """Base class. Subclasses implement ``trunk(x, input_ids, ...)`` mapping embedded tokens
    ``[B, S, d]`` to final hidden states ``[B, S, d]`` plus auxiliary loss and metrics."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = TokenEmbedding(cfg.vocab_size, cfg.d_model)
        kv_dim = cfg.kv_heads * cfg.head_dim
        self.value_embeds = nn.ModuleDict(
            {str(i): nn.Embedding(cfg.vocab_size, kv_dim) for i in range(cfg.total_layers) if cfg.has_value_embed(i)}
        )
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else LMHead(cfg.d_model, cfg.vocab_size)

    # ------------------------------------------------------------------ pieces
    def value_embed(self, layer: int, input_ids: Tensor) -> Tensor | None:
        key = str(layer)
        return self.value_embeds[key](input_ids) if key in self.value_embeds else None

    def head(self, h: Tensor) -> Tensor:
        """Final norm and output projection: ``[B, S, d] -> [B, S, vocab]`` logits."""
        h = self.norm(h)
        return self.embed(h, as_head=True) if self.lm_head is None else self.lm_head(h)

    def head_loss(self, h: Tensor, labels: Tensor) -> Tensor:
        """Summed cross-entropy (fp32 scalar) of the head's logits against ``labels``, fused:
        the ``[B, S, vocab]`` logits are never held (:mod:`mythos.model.loss`)."""
        h = self.norm(h)
        return self.embed(h, as_head=True, labels=labels) if self.lm_head is None else self.lm_head(h, labels)

    def run_block(
        self,
        block: Block,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        value_embed: Tensor | None,
        cache: KVCache | None,
        cache_key: tuple[int, int],
    ) -> Tensor:
        """One non-looped block, checkpointed per layer when configured and training."""
        if self.cfg.checkpoint_layers and self.training and cache is None and torch.is_grad_enabled():
            return checkpoint(block, x, rope, value_embed=value_embed, use_reentrant=False)[0]
        return block(x, rope, value_embed=value_embed, cache=cache, cache_key=cache_key)[0]

    def trunk(self, x: Tensor, input_ids: Tensor, rope: tuple[Tensor, Tensor], cache: KVCache | None,
              **kwargs) -> tuple[Tensor, Tensor | None, dict[str, Tensor]]:
        raise NotImplementedError

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: Tensor,
        labels: Tensor | None = None,
        *,
        cache: KVCache | None = None,
        return_logits: bool = False,
        **kwargs,
    ) -> ModelOutput:
        """input_ids: ``[B, S]`` int64; labels ``[B, S]`` (already shifted; -100 ignored). With
        labels the loss is computed by the fused head and ``logits`` is None unless
        ``return_logits`` (then the loss comes from those logits, the unfused way)."""
        start = cache.pos if cache is not None else 0
        rope = self.rope(start, input_ids.shape[1])
        x = self.embed(input_ids)
        h, aux_loss, aux = self.trunk(x, input_ids, rope, cache, **kwargs)
        if cache is not None:
            cache.pos += input_ids.shape[1]
        logits = self.head(h) if labels is None or return_logits else None
        out = ModelOutput(logits=logits, aux=aux, aux_loss=aux_loss)
        if labels is not None:
            if logits is None:
                ce_sum = self.head_loss(h, labels)
            else:
                ce_sum = F.cross_entropy(
                    logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
                )
            n_tokens = (labels != IGNORE_INDEX).sum()
            out.ce_sum, out.n_tokens = ce_sum, n_tokens
            out.loss = ce_sum / n_tokens.clamp(min=1)
            if aux_loss is not None:
                out.loss = out.loss + aux_loss
        return out

    # ------------------------------------------------------------------ optimiser support
    def param_kind(self, name: str, p: nn.Parameter) -> ParamKind:
        """How the optimiser should treat a parameter: ``matrix`` (2-D weights: Muon / weight
        decay), ``embedding`` (token and value embeddings, untied head), ``vector`` (norm gains,
        biases), ``lti`` (injection and readout parameters: no weight decay, per Parcae)."""
        if name.startswith(("embed.", "value_embeds.", "lm_head.", "loop_embed.")):
            return "embedding"
        if name.startswith("halt."):  # the ACT halting unit: a d -> 1 probe, not a weight matrix
            return "vector"
        if name.startswith(("injection.", "readout.")):
            return "lti"
        return "matrix" if p.dim() >= 2 else "vector"

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def compile_blocks(self, **compile_kwargs) -> CausalLM:
        """``torch.compile`` every transformer block in place (``nn.Module.compile``, so the
        state dict keys do not change); returns ``self``.

        Per-block compilation (as in torchtitan) instead of ``torch.compile(model)``: identical
        blocks share one compiled graph, and the RDT's loop stays a plain Python loop over the
        compiled core blocks, so a new loop count T never recompiles. Compiling the whole RDT
        would unroll the loop and recompile for every new T (and its host-side loop-count
        resolution would break the graph). Embedding, head and loss stay eager."""
        for module in self.modules():
            if isinstance(module, Block):
                module.compile(**compile_kwargs)
        return self

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        top_k: int = 0,
        use_cache: bool = True,
        eos_id: int | None = None,
        generator: torch.Generator | None = None,
        **kwargs,
    ) -> Tensor:
        """Autoregressive decoding. ``temperature=0`` is greedy. ``use_cache=False`` recomputes the
        full prefix every step (the reference the cache is tested against). Extra keyword
        arguments go to ``forward`` (e.g. ``num_loops`` for the RDT). Returns ``[B, S + new]``."""
        was_training = self.training
        self.eval()
        try:
            ids = input_ids
            cache = KVCache() if use_cache else None
            step_in = ids
            done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
            for _ in range(max_new_tokens):
                logits = self(step_in if use_cache else ids, cache=cache, **kwargs).logits[:, -1].float()
                if temperature <= 0:
                    nxt = logits.argmax(-1)
                else:
                    logits = logits / temperature
                    if top_k:
                        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
                        logits = logits.masked_fill(logits < kth, float("-inf"))
                    nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)
                if eos_id is not None:
                    nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                    done |= nxt == eos_id
                ids = torch.cat([ids, nxt[:, None]], dim=1)
                step_in = nxt[:, None]
                if eos_id is not None and bool(done.all()):
                    break
            return ids
        finally:
            self.train(was_training)
