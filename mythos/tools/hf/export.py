"""``mythos-export --hf``: any mythos model as a Hugging Face remote-code directory.

::

    DIR/config.json                 model_type "mythos", auto_map -> the two files below
    DIR/configuration_mythos.py     MythosConfig            (copied from mythos/tools/hf/)
    DIR/modeling_mythos.py          MythosForCausalLM       (copied from mythos/tools/hf/)
    DIR/model.safetensors           our parameter names under "model." (lm_head.weight untied)
    DIR/tokenizer.*, generation_config.json                 (with a tokenizer, as --hf-llama)

``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` loads it with torch and
transformers only. The parameter names are mythos' own, so the weights need no rename and no
head permutation: a key that does not match the model the config describes is an error here,
not a silently random tensor at load time.

Every option of :class:`~mythos.model.config.ModelConfig` that changes what the model computes at
inference is carried into ``config.json`` (block style, value-embedding layers, RDT injection,
LoRA, loop embedding, ACT, the core's MoE FFN, the KL early exit, the default loop count
``loops.eval_loops`` or ``round(loops.mean)``); training-only options (loop sampling, truncated
backprop, noise ``h_0``, init, checkpointing, the MoE balance weight) are not needed. What the
exported code cannot compute is refused in one line naming the option
(:func:`hf_incompatibilities`): any option added to ModelConfig after this exporter was written.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mythos.data.tokenizer import Tokenizer
from mythos.model.base import CausalLM
from mythos.model.config import ModelConfig
from mythos.tools.hf.files import (
    HF_CONFIG_NAME,
    WEIGHTS_NAME,
    check_hf_tokenizer,
    write_hub_files,
    write_json,
    write_text,
)
from mythos.weights import matching_state_dict, save_tensors

CODE_DIR = Path(__file__).resolve().parent
HF_CODE_FILES = ("configuration_mythos.py", "modeling_mythos.py")
AUTO_MAP = {"AutoConfig": "configuration_mythos.MythosConfig",
            "AutoModelForCausalLM": "modeling_mythos.MythosForCausalLM"}

#: ModelConfig options this exporter knows (dotted for nested sections): carried into
#: config.json, or training-only. Anything else with a non-default value is refused, so an option
#: added later cannot be dropped silently.
KNOWN_OPTIONS = frozenset({
    "kind", "name", "vocab_size", "d_model", "n_heads", "n_kv_heads", "max_seq_len", "rope_theta", "norm_eps",
    "mlp", "mlp_hidden", "qk_norm", "value_embeds", "tie_embeddings", "zero_init_out", "init_std", "n_layers",
    "n_prelude", "n_core", "n_coda", "injection", "a_bar_init", "h0", "h0_std", "loop_embed", "early_exit_kl",
    "checkpoint_layers", "checkpoint_loops",
    *(f"loops.{f.name}" for f in dataclasses.fields(ModelConfig().loops)),
    "act.enabled", "act.halt_bias_init", "act.threshold", "act.ponder_weight",
    "lora.rank", "lora.alpha", "lora.max_iters",
    "moe.enabled", "moe.num_experts", "moe.top_k", "moe.num_shared", "moe.expert_hidden",
    "moe.balance_weight",  # training only
})


def _options(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten a (nested) config dataclass to ``{"loops.mean": 8.0, ...}``."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out.update(_options(value, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = value
    return out


def hf_incompatibilities(cfg: ModelConfig) -> list[str]:
    """Options of ``cfg`` that ``MythosForCausalLM`` cannot compute, as ``name=value`` (empty when
    exportable)."""
    bad = []
    defaults = _options(ModelConfig())
    for name, value in _options(cfg).items():
        if name not in KNOWN_OPTIONS and value != defaults.get(name):
            bad.append(f"{name}={value} (unknown to the --hf export)")
    if cfg.mlp not in ("swiglu", "relu2"):
        bad.append(f"mlp={cfg.mlp}")
    if cfg.injection not in ("lti", "additive", "concat"):
        bad.append(f"injection={cfg.injection}")
    return bad


def default_loops(cfg: ModelConfig) -> int:
    """The loop count our model runs in eval mode when the caller passes none (RDT)."""
    return int(cfg.loops.eval_loops or round(cfg.loops.mean))


def hf_config(cfg: ModelConfig, dtype: torch.dtype = torch.float32,
              token_ids: Mapping[str, int] | None = None) -> dict[str, Any]:
    """``config.json`` contents (``MythosConfig``'s fields; the dtype as both ``dtype`` (5.x) and
    ``torch_dtype`` (4.x)); ``token_ids`` (``bos/eos/pad_token_id``) added when given."""
    dtype_name = str(dtype).removeprefix("torch.")
    rdt = cfg.kind == "rdt"
    loops = default_loops(cfg) if rdt else 1
    return {
        **(token_ids or {}),
        "architectures": ["MythosForCausalLM"],
        "model_type": "mythos",
        "auto_map": dict(AUTO_MAP),
        "mythos_kind": cfg.kind,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.norm_eps,
        "mlp": cfg.mlp,
        "intermediate_size": cfg.ffn_hidden,
        "qk_norm": cfg.qk_norm,
        "value_embed_layers": [i for i in range(cfg.total_layers) if cfg.has_value_embed(i)],
        "tie_word_embeddings": cfg.tie_embeddings,
        "n_layers": cfg.n_layers,
        "n_prelude": cfg.n_prelude,
        "n_core": cfg.n_core,
        "n_coda": cfg.n_coda,
        "injection": cfg.injection,
        "num_loops": loops,
        "loop_embed": cfg.loop_embed,
        "loop_embed_size": cfg.lora.max_iters,  # our loop embedding has one row per LoRA iteration
        "lora_rank": cfg.lora.rank,
        "lora_alpha": cfg.lora.alpha,
        "lora_max_iters": cfg.lora.max_iters,
        **_moe_fields(cfg),
        "act_enabled": cfg.act.enabled,
        "act_threshold": cfg.act.threshold,
        "early_exit_kl": cfg.early_exit_kl,
        "initializer_range": cfg.init_std,
        "use_cache": True,
        "num_hidden_layers": cfg.n_prelude + cfg.n_coda + loops * cfg.n_core if rdt else cfg.n_layers,
        "dtype": dtype_name,
        "torch_dtype": dtype_name,
        "mythos_model_config": dataclasses.asdict(cfg),
    }


def _moe_fields(cfg: ModelConfig) -> dict[str, int]:
    """The core's MoE in ``config.json`` (``moe_num_experts=0``: none); the expert width is
    resolved here exactly as :class:`mythos.model.moe.MoE` resolves it."""
    m = cfg.moe
    if not m.enabled:
        return {"moe_num_experts": 0}
    hidden = m.expert_hidden or max(cfg.ffn_hidden // m.top_k, 1)
    return {"moe_num_experts": m.num_experts, "moe_top_k": m.top_k, "moe_num_shared": m.num_shared,
            "moe_intermediate_size": hidden}


def hf_state_dict(state_dict: Mapping[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Our parameters under ``model.`` (``lm_head.weight`` stays: the untied head). The keys must
    be exactly those of ``cfg``'s model (:func:`mythos.weights.matching_state_dict`)."""
    sd = matching_state_dict(state_dict, cfg)
    return {(k if k == "lm_head.weight" else f"model.{k}"): v for k, v in sd.items()}


def to_hf(model: CausalLM | None, out_dir: str | Path, *, dtype: torch.dtype = torch.float32,
          cfg: ModelConfig | None = None, state_dict: Mapping[str, Tensor] | None = None,
          tokenizer: Tokenizer | str | Path | None = None) -> Path:
    """Write ``model`` (any kind) as a ``MythosForCausalLM`` remote-code directory; returns
    ``out_dir``. With ``tokenizer`` (a :class:`Tokenizer` or its ``tokenizer.model``) also the
    tokenizer files and ``generation_config.json``, and the token ids in ``config.json``.

    ``ValueError`` (one line) before anything is written when an option cannot be exported, the
    weights do not match ``cfg`` or the tokenizer cannot be written exactly. ``cfg`` /
    ``state_dict`` default to the model's (pass them to export merged weights without a live
    model: ``model`` may then be None). Files are written atomically: weights and code first,
    ``config.json`` last, so a directory with a ``config.json`` is complete."""
    cfg = cfg if cfg is not None else model.cfg
    if bad := hf_incompatibilities(cfg):
        raise ValueError(f"cannot export '{cfg.name or cfg.kind}' with --hf: {', '.join(bad)}")
    tok = tokenizer if tokenizer is None or isinstance(tokenizer, Tokenizer) else Tokenizer(tokenizer)
    if tok is not None:
        check_hf_tokenizer(tok, cfg)
    tensors = hf_state_dict(state_dict if state_dict is not None else model.state_dict(), cfg)
    out = Path(out_dir)
    save_tensors(out / WEIGHTS_NAME, tensors, dtype)
    for name in HF_CODE_FILES:
        write_text(out / name, (CODE_DIR / name).read_text(encoding="utf-8"))
    ids = write_hub_files(tok, cfg, out) if tok is not None else None
    write_json(out / HF_CONFIG_NAME, hf_config(cfg, dtype, ids))
    return out
