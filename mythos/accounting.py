"""Parameter and FLOPs accounting for the dense baseline and the RDT (docs/design.md, "FLOPs accounting").

Long because this docstring is the written contract of the FLOPs conventions (MFU, matched
compute and the planner depend on it). The ``mythos-accounting`` table that prints these numbers
is a tool: :mod:`mythos.tools.flops_table`.

Parameters are counted exactly by instantiating the model on the meta device (no memory, no
init), so the numbers can never drift from the code. FLOPs are counted *structurally* from the
same module tree:

- **Matmul parameters** are the weights of ``nn.Linear`` layers (including the LoRA adapter of
  the one iteration a token runs, the MoE's router plus its ``top_k`` routed and shared experts)
  and the LM head. A matmul with ``P`` weights costs ``2P`` FLOPs per token forward and ``4P``
  backward (input grads + weight grads).
- **Not FLOPs**: token-embedding and value-embedding lookups (gathers), norms, RoPE, softmax,
  activations, residual adds, the LTI injection's elementwise update. They are memory-bound and
  small; ``torch.utils.flop_counter.FlopCounterMode`` does not count them either.
- **The LM head is a matmul**, tied or not: ``logits = norm(h) @ W_embed^T`` costs ``2 V d`` per
  token even though, when tied, its weights are also the embedding table.
- **Attention scores** (``Q K^T`` and ``P V``) cost ``2 * 2 * S * d_attn`` per token per layer
  application forward (``d_attn = n_heads * head_dim``; with GQA the query heads set the cost) and
  twice that backward: ``12 * S * d_attn`` per layer for forward + backward, the nanoGPT/PaLM
  convention. We count the full ``S x S`` score matrix, *without* halving for the causal mask:
  it is what the dense attention kernels and ``FlopCounterMode`` count, and what MFU figures in
  the literature use. A causal-aware count would halve these terms.

Dense: ``forward = 2 N_matmul + attn``, ``backward = 4 N_matmul + 2 attn`` -> ``6 N + 12 L S d``.

RDT with ``E[T]`` iterations forward and ``E[k] = E[min(T, bwd_depth)]`` iterations backward
(truncated backprop; ``bwd_depth = 0`` is full backprop, ``k = T``)::

    forward  = 2 (P_pre + E[T] P_core + P_coda + P_head) + attn over (n_pre + E[T] n_core + n_coda) layers
    backward = 4 (P_pre + E[k] P_core + P_coda + P_head) + 2 attn over (n_pre + E[k] n_core + n_coda) layers

- ``P_pre`` = prelude blocks + the injection's once-per-forward matmul (the LTI ``B e`` or the
  concat adapter's ``W_e e``: ``e`` is constant across iterations, see ``injection.prepare``). The
  prelude's backward *is* counted: truncation stops the gradient through ``h``, but the gradient
  reaches the prelude through the injected ``B e`` of every tracked iteration.
- ``P_core`` = per-iteration matmuls: core blocks (MoE active parameters, one LoRA adapter), the
  concat adapter's ``W_h h`` and the ACT halting unit.
- ``P_coda`` = the readout ``C`` (once) + coda blocks; ``P_head`` = ``V d``.

**MFU vs HFU.** ``flops_per_token`` counts model FLOPs (for MFU). With ``include_recompute`` it
adds ``recompute``: activation checkpointing re-runs the forward of every checkpointed region
during backward (``checkpoint_layers``: dense blocks / prelude and coda blocks;
``checkpoint_loops``: the ``E[k]`` grad-tracked core iterations) -- the hardware FLOPs (HFU).
Non-reentrant checkpointing (torch's default ``early_stop``) stops re-running a region as soon
as every tensor saved for backward is back; the region's trailing matmul, whose output only feeds
the residual add (which saves nothing), is then skipped: the last block's ``down_proj`` (with LoRA:
only its adapter's ``B`` matmul; an MoE's final weighting saves its inputs, so nothing is skipped).
We subtract exactly that, which makes ``recompute`` match ``FlopCounterMode``.

**Executed vs expected loops.** With ``loops.execution=active`` (the default) every core iteration
runs only the sequences still looping, so the hardware executes the model's ``E[T]`` / ``E[k]``
iterations per sequence (ZeRO-3's zero-row lockstep calls cost no FLOPs). With ``masked`` every
sequence runs the global batch's ``max T`` -- ~1.6x the core work at Poisson(8), batch 512.
:func:`executed_loops` gives both; pass its result as ``loops_mean``/``bwd_loops_mean`` for HFU.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from mythos.model.build import build_model
from mythos.model.config import LoopConfig, ModelConfig
from mythos.model.loops import executed_loops as step_executed_loops
from mythos.model.loops import expected_loops, sample_loop_counts
from mythos.model.moe import MoE
from mythos.train.config import RunConfig

# ---------------------------------------------------------------------------------------------
# parameters

#: Top-level module name -> accounting part. Parameters of modules not listed land in ``other``
#: (so a newly added module is still counted in the totals, and a test flags it).
_PARTS_DENSE = {"embed": "embed", "value_embeds": "value_embeds", "layers": "blocks", "norm": "norm",
                "lm_head": "head"}
_PARTS_RDT = {"embed": "embed", "value_embeds": "value_embeds", "prelude": "prelude",
              "injection": "injection", "core": "core", "readout": "readout", "coda": "coda",
              "prelude_norm": "norm", "norm": "norm", "lm_head": "head", "loop_embed": "extras",
              "halt": "extras"}
_EMBEDDING_PARTS = ("embed", "value_embeds", "head")


@dataclass(frozen=True)
class ParamCounts:
    """Exact parameter counts of one config.

    ``parts`` (ordered) partitions every parameter once. Dense: ``embed, value_embeds, blocks,
    norm, head``; RDT: ``embed, value_embeds, prelude, injection, core, readout, coda, norm, head,
    extras``. ``norm`` holds the final RMSNorm (and the RDT's prelude norm), ``head`` the untied LM
    head (0 when tied), ``extras`` the RDT's loop embedding and ACT halting unit. ``embedding`` =
    token embedding + value-embedding tables + untied head; ``non_embedding = total - embedding``.
    """

    name: str
    kind: str
    parts: dict[str, int]
    total: int
    embedding: int
    non_embedding: int


def meta_model(cfg: ModelConfig) -> nn.Module:
    return build_model(cfg, device="meta")


def count_params(cfg: ModelConfig, model: nn.Module | None = None) -> ParamCounts:
    """Exact counts for ``cfg``; builds the model on the meta device unless ``model`` is given."""
    model = model if model is not None else meta_model(cfg)
    table = _PARTS_DENSE if cfg.kind == "dense" else _PARTS_RDT
    parts = dict.fromkeys(dict.fromkeys(table.values()), 0)
    for name, p in model.named_parameters():
        part = table.get(name.split(".", 1)[0], "other")
        parts[part] = parts.get(part, 0) + p.numel()
    total = sum(parts.values())
    embedding = sum(parts[k] for k in _EMBEDDING_PARTS)
    return ParamCounts(name=cfg.name, kind=cfg.kind, parts=parts, total=total, embedding=embedding,
                       non_embedding=total - embedding)


# ---------------------------------------------------------------------------------------------
# matmul parameters (what one token multiplies by, per application)


def matmul_params(module: nn.Module) -> int:
    """Weights one token is multiplied by in one application of ``module``.

    ``nn.Linear`` (incl. ``LoopLinear``): its weight plus one rank-r LoRA adapter
    ``r (d_in + d_out)`` (a token uses the adapter of its own iteration only). ``MoE``: router +
    ``top_k`` routed experts + the shared expert(s). Embeddings are lookups: 0. Biases are adds: 0.
    """
    if isinstance(module, MoE):
        routed = matmul_params(module.experts[0]) * module.top_k
        shared = matmul_params(module.shared) if module.shared is not None else 0
        return module.router.weight.numel() + routed + shared
    if isinstance(module, nn.Linear):
        lora = getattr(module, "lora_rank", 0) * (module.in_features + module.out_features)
        return module.weight.numel() + lora
    if isinstance(module, nn.Embedding):
        return 0
    return sum(matmul_params(c) for c in module.children())


def _recompute_skipped(block: nn.Module) -> int:
    """Matmul parameters of ``block``'s trailing matmul that an early-stopping checkpoint does not
    re-run (see the module docstring): ``down_proj``'s output is consumed only by the residual
    add, so once its input is re-saved recomputation stops."""
    mlp = block.mlp
    if isinstance(mlp, MoE):
        return 0  # the weighted sum of expert outputs saves them, and the balance loss comes last
    down = mlp.down_proj
    if getattr(down, "lora_rank", 0):
        return down.lora_rank * down.out_features  # base matmul ran earlier; only the B adapter
    return down.weight.numel()


@dataclass(frozen=True)
class MatmulParams:
    """Matmul parameters by how often they run per token (see the module docstring).

    Dense: ``pre`` = all blocks, ``core = 0``. RDT: ``pre`` = prelude + injection-once,
    ``core`` = one iteration (``core_ckpt``: the part inside the per-iteration checkpoint, i.e.
    without the ACT halting unit), ``post`` = readout + coda. ``head`` = ``V d`` (tied or not).
    ``*_layers`` count attention layers; ``ckpt_*`` is what ``checkpoint_layers`` wraps and
    ``*_skipped`` what early-stopping recomputation leaves out. ``inj_step`` is the concat
    adapter's per-iteration ``W_h`` (part of ``core``).
    """

    pre: int
    core: int
    core_ckpt: int
    post: int
    head: int
    pre_layers: int
    core_layers: int
    post_layers: int
    ckpt_blocks: int = 0
    ckpt_layers: int = 0
    ckpt_blocks_skipped: int = 0
    core_ckpt_skipped: int = 0
    inj_step: int = 0


def count_matmul_params(cfg: ModelConfig, model: nn.Module | None = None) -> MatmulParams:
    model = model if model is not None else meta_model(cfg)
    head = cfg.vocab_size * cfg.d_model
    if cfg.kind == "dense":
        blocks = matmul_params(model.layers)
        return MatmulParams(pre=blocks, core=0, core_ckpt=0, post=0, head=head, pre_layers=cfg.n_layers,
                            core_layers=0, post_layers=0, ckpt_blocks=blocks, ckpt_layers=cfg.n_layers,
                            ckpt_blocks_skipped=sum(_recompute_skipped(b) for b in model.layers))
    inj = model.injection
    inj_once = sum(matmul_params(getattr(inj, n)) for n in ("B", "e_proj") if hasattr(inj, n))
    inj_step = matmul_params(inj.h_proj) if hasattr(inj, "h_proj") else 0
    prelude, coda = matmul_params(model.prelude), matmul_params(model.coda)
    core_ckpt = matmul_params(model.core) + inj_step
    halt = matmul_params(model.halt) if model.halt is not None else 0
    return MatmulParams(
        pre=prelude + inj_once, core=core_ckpt + halt, core_ckpt=core_ckpt,
        post=matmul_params(model.readout) + coda, head=head,
        pre_layers=cfg.n_prelude, core_layers=cfg.n_core, post_layers=cfg.n_coda,
        ckpt_blocks=prelude + coda, ckpt_layers=cfg.n_prelude + cfg.n_coda,
        ckpt_blocks_skipped=sum(_recompute_skipped(b) for b in [*model.prelude, *model.coda]),
        core_ckpt_skipped=_recompute_skipped(model.core[-1]), inj_step=inj_step,
    )


# ---------------------------------------------------------------------------------------------
# FLOPs


@dataclass(frozen=True)
class FlopsBreakdown:
    """Training FLOPs per token (one forward + backward over a sequence of ``seq_len``).

    ``forward``/``backward``/``recompute`` include the attention-score terms, which are also given
    separately (``attn_*``). ``recompute`` is 0 unless requested (HFU). ``loops``/``bwd_loops``
    are the E[T]/E[k] used (1/1 for dense). ``total = forward + backward + recompute``.
    """

    name: str
    seq_len: int
    forward: float
    backward: float
    recompute: float
    attn_forward: float
    attn_backward: float
    attn_recompute: float
    loops: float = 1.0
    bwd_loops: float = 1.0
    matmul: MatmulParams | None = field(default=None, repr=False)

    @property
    def total(self) -> float:
        return self.forward + self.backward + self.recompute

    @property
    def attention(self) -> float:
        return self.attn_forward + self.attn_backward + self.attn_recompute

    @property
    def total_no_attention(self) -> float:
        return self.total - self.attention


def attention_flops_per_layer(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token of one attention layer's score and value matmuls:
    ``2 * S * d_attn`` each for ``Q K^T`` and ``P V`` (full ``S x S``, no causal halving)."""
    return 4.0 * seq_len * cfg.n_heads * cfg.head_dim


def resolve_loops(cfg: ModelConfig, loops_mean: float | None = None, bwd_depth: int | None = None,
                  bwd_loops_mean: float | None = None) -> tuple[float, float]:
    """``(E[T], E[k])`` for an RDT config.

    ``loops_mean`` given: T is that fixed (possibly fractional) count and ``k = min(T, bwd_depth)``,
    or ``bwd_loops_mean`` when given (e.g. the iterations a step actually executed, forward and
    backward). Otherwise both come from ``cfg.loops``'s schedule via
    :func:`mythos.model.loops.expected_loops` (``bwd_depth`` overrides the config's).
    ``bwd_depth = 0`` is full backprop: ``k = T``.
    """
    bwd = cfg.loops.bwd_depth if bwd_depth is None else bwd_depth
    if bwd < 0:
        raise ValueError(f"bwd_depth must be >= 0, got {bwd}")
    if loops_mean is not None:
        if loops_mean <= 0:
            raise ValueError(f"loops_mean must be > 0, got {loops_mean}")
        if bwd_loops_mean is not None:
            return float(loops_mean), float(bwd_loops_mean)
        return float(loops_mean), float(loops_mean if bwd == 0 else min(loops_mean, bwd))
    return expected_loops(dataclasses.replace(cfg.loops, bwd_depth=bwd))


def executed_loops(loops: LoopConfig, global_batch: int, *, steps: int = 2000) -> tuple[float, float]:
    """Expected ``(forward, backward)`` core iterations per sequence the RDT *executes* per step
    at ``global_batch``, for HFU (:func:`mythos.model.loops.executed_loops` per step): with
    ``execution=active`` the sequences' own ``E[T]`` and ``E[min(T, bwd_depth)]`` (the model
    FLOPs); with ``masked`` the global batch's ``max T`` for every sequence. Monte Carlo over
    ``steps`` steps of the real sampler (seed 0). ``schedule=hops`` depends on the data: its
    planning estimate (:func:`mythos.model.loops.expected_loops`) stands in."""
    if loops.schedule == "hops":
        return expected_loops(loops)
    per_step = torch.tensor([step_executed_loops(loops, sample_loop_counts(loops, 0, s, global_batch))
                             for s in range(steps)], dtype=torch.float64)
    return float(per_step[:, 0].mean()), float(per_step[:, 1].mean())


def flops_per_token(
    cfg: ModelConfig,
    seq_len: int,
    *,
    loops_mean: float | None = None,
    bwd_depth: int | None = None,
    bwd_loops_mean: float | None = None,
    include_recompute: bool = False,
    model: nn.Module | None = None,
) -> FlopsBreakdown:
    """Training FLOPs per token for ``cfg`` at ``seq_len`` (see the module docstring for the
    convention). ``loops_mean``/``bwd_depth`` override the RDT's loop statistics (see
    :func:`resolve_loops`); ignored for dense. ``include_recompute`` adds the activation-
    checkpointing re-forward (HFU). ``model`` reuses an already-built (e.g. meta) model."""
    mm = count_matmul_params(cfg, model)
    attn = attention_flops_per_layer(cfg, seq_len)
    # dense: every block is in ``pre`` and ``core`` is empty, so T = k = 1 is exact
    t, k = (1.0, 1.0) if cfg.kind == "dense" else resolve_loops(cfg, loops_mean, bwd_depth, bwd_loops_mean)
    fwd_params = mm.pre + t * mm.core + mm.post + mm.head
    bwd_params = mm.pre + k * mm.core + mm.post + mm.head
    # The first grad-tracked iteration's input state h comes from no_grad (or is h_0), so the
    # concat adapter's W_h h there needs a weight gradient only: 2 instead of 4 FLOPs per weight.
    bwd_saved = 2.0 * mm.inj_step
    attn_fwd = attn * (mm.pre_layers + t * mm.core_layers + mm.post_layers)
    attn_bwd = 2.0 * attn * (mm.pre_layers + k * mm.core_layers + mm.post_layers)

    recompute = attn_re = 0.0
    if include_recompute:
        if cfg.checkpoint_layers:
            recompute += 2.0 * (mm.ckpt_blocks - mm.ckpt_blocks_skipped)
            attn_re += attn * mm.ckpt_layers
        if cfg.kind == "rdt" and cfg.checkpoint_loops:
            recompute += 2.0 * k * (mm.core_ckpt - mm.core_ckpt_skipped)
            attn_re += attn * k * mm.core_layers
    return FlopsBreakdown(
        name=cfg.name, seq_len=seq_len,
        forward=2.0 * fwd_params + attn_fwd, backward=4.0 * bwd_params - bwd_saved + attn_bwd,
        recompute=recompute + attn_re,
        attn_forward=attn_fwd, attn_backward=attn_bwd, attn_recompute=attn_re,
        loops=t, bwd_loops=k, matmul=mm,
    )



@dataclass(frozen=True)
class ArmCosts:
    params: int
    non_embedding: int
    model: float
    executed: float
    hardware: float
    loops_expected: float | None
    loops_executed: float | None


def arm_costs(cfg: RunConfig, seq_len: int) -> ArmCosts:
    """Parameter count and the three FLOPs-per-token figures of one run config: model (the RDT at
    E[T]), executed (the loops the hardware runs for a global batch) and hardware (+ recompute).
    The one cost model the planner (mythos.tools.plan) and the dry run (mythos.train.dryrun) share."""
    model = build_model(cfg.model, device="meta")
    pc = count_params(cfg.model, model)
    fpt = flops_per_token(cfg.model, seq_len, model=model)
    if cfg.model.kind == "rdt":
        n, k = executed_loops(cfg.model.loops, cfg.train.global_batch_size)
        exe = flops_per_token(cfg.model, seq_len, loops_mean=n, bwd_loops_mean=k, model=model)
        hw = flops_per_token(cfg.model, seq_len, loops_mean=n, bwd_loops_mean=k, include_recompute=True,
                             model=model)
        return ArmCosts(pc.total, pc.non_embedding, fpt.total, exe.total, hw.total, fpt.loops, n)
    hw = flops_per_token(cfg.model, seq_len, include_recompute=True, model=model)
    return ArmCosts(pc.total, pc.non_embedding, fpt.total, fpt.total, hw.total, None, None)


# ---------------------------------------------------------------------------------------------
# MFU


#: Dense (no sparsity) bf16 tensor-core peak per device, FLOP/s, from vendor datasheets. Matched
#: in order against ``torch.cuda.get_device_name()``, so specific variants come first.
_PEAK_BF16: tuple[tuple[str, float], ...] = (
    ("gh200", 989.5e12),
    ("h200", 989.5e12),
    ("h100 pcie", 756.0e12),
    ("h100 nvl", 835.0e12),
    ("h100", 989.5e12),      # SXM5 (e.g. "NVIDIA H100 80GB HBM3")
    ("h800", 989.5e12),
    ("gb200", 2500.0e12),
    ("b200", 2250.0e12),
    ("a100", 312.0e12),      # SXM and PCIe
    ("a800", 312.0e12),
    ("l40s", 362.05e12),
    ("a10g", 70.0e12),
    ("a10", 125.0e12),
    ("l4", 121.0e12),
    ("rtx 4090", 165.2e12),
    ("rtx 3090", 71.0e12),
    ("v100", 125.0e12),      # fp16 tensor cores (no bf16)
    ("mi300x", 1307.4e12),
    ("mi250x", 383.0e12),
)


def peak_flops_for_device(name: str) -> float | None:
    """Peak dense bf16 FLOP/s for a device name such as ``torch.cuda.get_device_name()``
    (``"NVIDIA H100 80GB HBM3"`` -> 989.5e12); None when unknown (the trainer then needs a
    configured peak)."""
    low = name.lower()
    for key, peak in _PEAK_BF16:
        if key in low:
            return peak
    return None


def mfu(tokens_per_s: float, flops_per_token: float | FlopsBreakdown, peak_flops: float) -> float:
    """Model FLOPs utilisation: ``tokens_per_s * flops_per_token / peak_flops``. Use per-device
    throughput with a per-device peak. Passing a breakdown built with ``include_recompute=True``
    gives HFU instead."""
    per_token = flops_per_token.total if isinstance(flops_per_token, FlopsBreakdown) else flops_per_token
    if peak_flops <= 0:
        raise ValueError(f"peak_flops must be > 0, got {peak_flops}")
    return tokens_per_s * per_token / peak_flops


# ---------------------------------------------------------------------------------------------
# pair ratios (does a small RDT/dense pair mirror a large one?)

#: Ratio rows of :func:`pair_ratios`: key -> label. Each is compared *relative* to a reference pair.
PAIR_RATIO_ROWS = {
    "params": "total params (RDT / dense)",
    "non_embedding": "non-embedding params (RDT / dense)",
    "train_flops": "training model FLOPs/token (RDT / dense)",
    "forward_depth": "forward layer applications/token (RDT / dense)",
    "loops": "E[T] (RDT)",
    "bwd_loops": "E[k] = E[min(T, bwd_depth)] (RDT)",
    "embedding_share_a": "embedding share of params (RDT)",
    "embedding_share_b": "embedding share of params (dense)",
}
#: Share rows: key -> label; compared against :data:`HEAD_SHARE_MAX` (absolute), not relatively.
PAIR_SHARE_ROWS = {"head_share_a": "LM-head share of training FLOPs (RDT)",
                   "head_share_b": "LM-head share of training FLOPs (dense)"}
#: A "small" head share: the old 8192-vocab analogue put 30% of its FLOPs in the head, the cluster 4-6%.
HEAD_SHARE_MAX = 0.15


def pair_ratios(rdt: ModelConfig, dense: ModelConfig, seq_len: int) -> dict[str, float]:
    """The numbers that say whether an RDT/dense pair is a scale model of another (issue 20):
    :data:`PAIR_RATIO_ROWS` and :data:`PAIR_SHARE_ROWS`, from the exact counts and the training
    model FLOPs of :func:`flops_per_token` at ``seq_len``. ``forward_depth`` is
    ``(n_prelude + E[T] n_core + n_coda) / n_layers``; the head share is ``6 V d`` (forward +
    backward) over the total."""
    if rdt.kind != "rdt" or dense.kind != "dense":
        raise ValueError(f"pair_ratios takes an rdt and a dense config, got {rdt.kind} and {dense.kind}")
    pa, pb = count_params(rdt), count_params(dense)
    fa, fb = flops_per_token(rdt, seq_len), flops_per_token(dense, seq_len)
    assert fa.matmul is not None and fb.matmul is not None
    return {
        "params": pa.total / pb.total,
        "non_embedding": pa.non_embedding / pb.non_embedding,
        "train_flops": fa.total / fb.total,
        "forward_depth": (rdt.n_prelude + fa.loops * rdt.n_core + rdt.n_coda) / dense.n_layers,
        "loops": fa.loops,
        "bwd_loops": fa.bwd_loops,
        "embedding_share_a": pa.embedding / pa.total,
        "embedding_share_b": pb.embedding / pb.total,
        "head_share_a": 6.0 * fa.matmul.head / fa.total,
        "head_share_b": 6.0 * fb.matmul.head / fb.total,
    }


def ratio_flags(analogue: dict[str, float], reference: dict[str, float], tol: float = 0.10) -> list[str]:
    """Keys of ``analogue`` (from :func:`pair_ratios`) more than ``tol`` (relative) off the
    ``reference`` pair's, and head shares above :data:`HEAD_SHARE_MAX`."""
    off = [k for k in PAIR_RATIO_ROWS if abs(analogue[k] / reference[k] - 1.0) > tol]
    return off + [k for k in PAIR_SHARE_ROWS if analogue[k] > HEAD_SHARE_MAX]
