"""``MythosConfig``: the Hugging Face configuration of an exported mythos model (remote code).

Written by ``mythos-export --hf`` next to ``modeling_mythos.py``; it needs only ``transformers``
(no import of mythos: the exported directory must load where mythos is not installed).

One config for both kinds (``mythos_kind``):

- ``dense``: ``n_layers`` pre-norm blocks.
- ``rdt``: ``n_prelude`` blocks, an ``n_core``-block core looped ``num_loops`` times (LTI /
  additive / concat state injection, optional depth-wise LoRA, loop embedding, ACT halting),
  a ``d x d`` readout and ``n_coda`` blocks.

Block options shared by both: ``mlp`` (``swiglu`` | ``relu2``), ``qk_norm`` (parameter-free
RMSNorm of q and k per head), ``value_embed_layers`` (the layers, counted prelude -> core -> coda,
that add a token-indexed table to V) and ``tie_word_embeddings``.

``num_hidden_layers`` is the number of KV-cache slots at the default loop count (``n_prelude +
n_coda + num_loops * n_core`` for the RDT, ``n_layers`` for the dense): what ``DynamicCache(config)``
pre-allocates. The model adds slots when a call runs more loops (see ``modeling_mythos``).
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig


class MythosConfig(PretrainedConfig):
    """Configuration of ``MythosForCausalLM``. Defaults describe a tiny RDT; an export writes
    every field. ``mythos_model_config`` keeps the training-side model config (provenance only:
    nothing here reads it)."""

    model_type = "mythos"

    def __init__(
        self,
        mythos_kind: str = "rdt",
        vocab_size: int = 1024,
        hidden_size: int = 64,
        num_attention_heads: int = 4,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        max_position_embeddings: int = 2048,
        rope_theta: float = 10000.0,
        rms_norm_eps: float = 1e-5,
        mlp: str = "swiglu",
        intermediate_size: int = 256,
        qk_norm: bool = False,
        value_embed_layers: list[int] | None = None,
        n_layers: int = 0,
        n_prelude: int = 1,
        n_core: int = 1,
        n_coda: int = 1,
        injection: str = "lti",
        num_loops: int = 4,
        loop_embed: bool = False,
        loop_embed_size: int = 16,
        lora_rank: int = 0,
        lora_alpha: float = 16.0,
        lora_max_iters: int = 16,
        moe_num_experts: int = 0,
        moe_top_k: int = 2,
        moe_num_shared: int = 0,
        moe_intermediate_size: int = 0,
        act_enabled: bool = False,
        act_threshold: float = 0.99,
        early_exit_kl: float = 0.0,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        tie_word_embeddings: bool = True,
        num_hidden_layers: int | None = None,
        mythos_model_config: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self.mythos_kind = mythos_kind
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.mlp = mlp
        self.intermediate_size = intermediate_size
        self.qk_norm = qk_norm
        self.value_embed_layers = list(value_embed_layers or [])
        self.n_layers = n_layers
        self.n_prelude = n_prelude
        self.n_core = n_core
        self.n_coda = n_coda
        self.injection = injection
        self.num_loops = num_loops
        self.loop_embed = loop_embed
        self.loop_embed_size = loop_embed_size
        self.lora_rank = lora_rank
        self.lora_alpha = lora_alpha
        self.lora_max_iters = lora_max_iters
        self.moe_num_experts = moe_num_experts  # 0: the core's FFN is a plain MLP
        self.moe_top_k = moe_top_k
        self.moe_num_shared = moe_num_shared
        self.moe_intermediate_size = moe_intermediate_size  # per expert (shared: x moe_num_shared)
        self.act_enabled = act_enabled
        self.act_threshold = act_threshold
        self.early_exit_kl = early_exit_kl
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        if num_hidden_layers is None:
            num_hidden_layers = n_layers if mythos_kind == "dense" else n_prelude + n_coda + num_loops * n_core
        self.num_hidden_layers = num_hidden_layers
        self.mythos_model_config = mythos_model_config or {}
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
