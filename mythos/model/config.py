"""Model configuration: one dataclass for both kinds (``dense`` and ``rdt``).

The shared block options (attention, MLP, value embeddings, ...) sit at the top level; the
RDT-only parts (loop sampling, injection, ACT, LoRA, MoE) are nested sections that a dense model
ignores. Presets live in ``configs/model/*.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(kw_only=True)
class LoopConfig:
    """How many times the recurrent core runs, and how far gradients flow back through it."""

    schedule: Literal["poisson", "lognormal_poisson", "fixed", "uniform", "hops"] = "poisson"
    """``poisson``: per sequence ``T = max(Poisson(mean), 1)`` (Parcae). ``lognormal_poisson``:
    one T per global batch from Huginn's log-normal Poisson. ``fixed``: always ``mean``.
    ``uniform``: per sequence ``T ~ U{min_loops, ..., max_loops}`` (a floor every sample reaches:
    the hop-agnostic chain arm, T >= the deepest training query + 1 independent of its hops).
    ``hops``: per sequence ``T = hops + hops_offset``, the sample's reasoning depth read from the
    task shards (``sample_hops`` in the manifest, :mod:`mythos.tasks`): on the multi-hop tasks a
    loop count independent of the hop count trains a T-invariant, memorising solution
    (docs/multihop_exploration.md)."""
    mean: float = 8.0
    """Mean loop count during training (Parcae mu=8; Huginn 32). With ``schedule=hops`` only the
    planning estimate of ``E[T]`` (FLOPs accounting before any data is read)."""
    hops_offset: int = 1
    """``schedule=hops``: loops beyond the hop count (one iteration to read the query)."""
    bwd_depth: int = 4
    """Truncated backprop: gradients through the last ``min(T, bwd_depth)`` iterations
    (Parcae mu_bwd=4; Huginn k=8). ``0`` means full backprop through every iteration."""
    max_loops: int = 64
    """Cap on a sampled T (keeps a rare Poisson/log-normal tail from stalling a step); the top of
    ``schedule=uniform``."""
    min_loops: int = 1
    """``schedule=uniform``: the smallest T drawn."""
    lognormal_sigma: float = 0.5
    """Huginn's sigma for the log-normal Poisson schedule."""
    eval_loops: int = 0
    """Loop count used in eval mode when the caller passes none (0 = round(mean))."""
    execution: Literal["active", "masked"] = "active"
    """How per-sequence loop counts run. ``active``: each iteration computes only the sequences
    still looping (a prefix of the batch once it is ordered by T): the core costs sum_i T_i.
    ``masked``: every sequence runs all ``max T`` iterations and finished rows are discarded
    (Parcae's way; costs ``B * max T``). Same per-sequence results; kept for A/B measurements."""

    def validate(self) -> None:
        if self.mean < 1:
            raise ValueError(f"loops.mean must be >= 1, got {self.mean}")
        if self.bwd_depth < 0:
            raise ValueError(f"loops.bwd_depth must be >= 0, got {self.bwd_depth}")
        if self.max_loops < 1:
            raise ValueError(f"loops.max_loops must be >= 1, got {self.max_loops}")
        if self.hops_offset < 0:
            raise ValueError(f"loops.hops_offset must be >= 0, got {self.hops_offset}")
        if not 1 <= self.min_loops <= self.max_loops:
            raise ValueError(f"loops.min_loops must be in [1, loops.max_loops={self.max_loops}], got {self.min_loops}")
        if self.schedule == "fixed" and not float(self.mean).is_integer():
            raise ValueError(f"loops.mean must be an integer for schedule=fixed, got {self.mean}")


@dataclass(kw_only=True)
class ACTConfig:
    """Adaptive Computation Time halting per position (Graves 2016). Off by default."""

    enabled: bool = False
    halt_bias_init: float = 1.0
    """Positive bias on the halting unit at init (Graves); larger halts earlier."""
    threshold: float = 0.99
    """A position halts once its cumulative halting probability reaches this (1 - epsilon)."""
    ponder_weight: float = 0.01
    """Weight of the ponder cost (mean N + R) added to the training loss."""


@dataclass(kw_only=True)
class LoRAConfig:
    """Depth-wise LoRA: a rank-r adapter per (iteration, projection) of the core (Bae et al.)."""

    rank: int = 0
    """0 disables LoRA."""
    alpha: float = 16.0
    max_iters: int = 16
    """Distinct adapters for iterations 0..max_iters-1; later iterations reuse the last."""


@dataclass(kw_only=True)
class MoEConfig:
    """Mixture-of-experts FFN for the core blocks (routed top-k + always-on shared experts)."""

    enabled: bool = False
    num_experts: int = 8
    top_k: int = 2
    num_shared: int = 1
    expert_hidden: int = 0
    """Hidden size of each expert; 0 = mlp_hidden // top_k (keeps active FLOPs near dense)."""
    balance_weight: float = 0.01
    """Weight of the Switch-style load-balancing loss."""


@dataclass(kw_only=True)
class ModelConfig:
    """Architecture of a dense baseline (``kind: dense``) or an RDT (``kind: rdt``).

    Shapes: ``d_model = n_heads * head_dim``; K/V use ``n_kv_heads`` heads (GQA when fewer than
    ``n_heads``). Layer indices for value embeddings count prelude, core and coda in order.
    """

    kind: Literal["dense", "rdt"] = "dense"
    name: str = ""
    vocab_size: int = 32768
    d_model: int = 512
    n_heads: int = 8
    n_kv_heads: int = 0
    """0 = same as n_heads (MHA)."""
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    mlp: Literal["swiglu", "relu2"] = "swiglu"
    mlp_hidden: int = 0
    """0 = 4*d_model for relu2, Llama's 8/3*d rounded up to a multiple of 256 for swiglu."""
    qk_norm: bool = False
    """Parameter-free RMSNorm of queries and keys per head."""
    value_embeds: Literal["none", "alternating", "all"] = "none"
    """Per-layer token-indexed tables added to V (modded-nanogpt/Parcae); ``alternating`` puts
    one on layers 0, 2, 4, ..."""
    tie_embeddings: bool = True
    zero_init_out: bool = True
    """Zero-init attention and MLP output projections (residual branch starts as identity)."""
    init_std: float = 0.02

    # dense
    n_layers: int = 0
    """Dense only: number of blocks."""

    # rdt
    n_prelude: int = 0
    n_core: int = 0
    n_coda: int = 0
    injection: Literal["lti", "additive", "concat"] = "lti"
    """``lti``: u = A_bar*h + dt*(B e) (Parcae); ``additive``: u = h + e (OpenMythos);
    ``concat``: u = W[h; e] (Huginn's adapter)."""
    a_bar_init: float = 0.4472135955
    """Initial A_bar = exp(-softplus(dt_bias)) with A_log = 0 (Parcae: sqrt(1/5))."""
    h0: Literal["noise", "zeros"] = "noise"
    """Initial recurrent state in training: truncated normal (std ``h0_std``) or zeros.
    In eval mode the state starts at zeros (the noise mean) so evaluation is deterministic."""
    h0_std: float = 0.02
    loop_embed: bool = False
    """Add a learned loop-index embedding to the injected state (ablation)."""
    loops: LoopConfig = field(default_factory=LoopConfig)
    act: ACTConfig = field(default_factory=ACTConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    early_exit_kl: float = 0.0
    """Inference: stop looping a token once KL(p_t || p_{t-1}) < this (Huginn ~5e-4); 0 = off."""

    # memory
    checkpoint_layers: bool = False
    """Activation checkpointing per block for dense blocks and the RDT prelude/coda."""
    checkpoint_loops: bool = False
    """Activation checkpointing per RDT iteration (memory O(bwd_depth), not O(T))."""

    # ------------------------------------------------------------------ derived
    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ffn_hidden(self) -> int:
        if self.mlp_hidden:
            return self.mlp_hidden
        if self.mlp == "relu2":
            return 4 * self.d_model
        return 256 * ((int(8 * self.d_model / 3) + 255) // 256)

    @property
    def total_layers(self) -> int:
        """Distinct blocks (weights), not executed applications."""
        if self.kind == "dense":
            return self.n_layers
        return self.n_prelude + self.n_core + self.n_coda

    def has_value_embed(self, layer: int) -> bool:
        if self.value_embeds == "all":
            return True
        return self.value_embeds == "alternating" and layer % 2 == 0

    @property
    def is_llama_style(self) -> bool:
        """Maps one-to-one onto Hugging Face ``LlamaForCausalLM``."""
        return (
            self.kind == "dense"
            and self.mlp == "swiglu"
            and not self.qk_norm
            and self.value_embeds == "none"
        )

    def validate(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.kv_heads}")
        if self.kind == "dense":
            if self.n_layers < 1:
                raise ValueError("kind=dense needs n_layers >= 1")
            if self.moe.enabled or self.act.enabled or self.lora.rank:
                raise ValueError("moe/act/lora are RDT core options; kind=dense does not use them")
        else:
            if self.n_core < 1:
                raise ValueError("kind=rdt needs n_core >= 1")
            if self.n_layers:
                raise ValueError("kind=rdt uses n_prelude/n_core/n_coda, not n_layers")
        if not 0.0 < self.a_bar_init < 1.0:
            raise ValueError(f"a_bar_init must be in (0, 1), got {self.a_bar_init}")
        if self.moe.enabled and not 1 <= self.moe.top_k <= self.moe.num_experts:
            raise ValueError(f"moe.top_k={self.moe.top_k} must be in [1, num_experts={self.moe.num_experts}]")
