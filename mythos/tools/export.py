"""Checkpoint export: consolidated fp32 safetensors or a Hugging Face directory, for any model.

- the default layout, :func:`mythos.weights.save_consolidated` (read back by
  :func:`mythos.weights.load_consolidated`): ``model.safetensors`` (fp32, our own parameter names)
  + ``config.yaml`` (the resolved :class:`ModelConfig`). Works for every model kind and
  round-trips exactly.
- :func:`to_hf_llama`: a ``LlamaForCausalLM`` directory (``config.json`` + ``model.safetensors``)
  for a Llama-style dense model, without importing ``transformers``. Our RoPE uses the same
  rotate-half layout as HF Llama (``cat(-x2, x1)`` with ``cos = cat(f, f)``), so q/k projection
  weights map one-to-one with no head permutation.
  With a ``tokenizer`` (always, from the CLI) the directory is Hub-complete: also the tokenizer
  (:mod:`mythos.tools.hf.tokenizer`: encodes exactly like our sentencepiece model) and
  ``generation_config.json``, so ``AutoTokenizer``, ``lm_eval --model hf`` and serving stacks load
  it as it is.
- :func:`mythos.tools.hf.export.to_hf` (``--hf``): any model kind (RDT, Parcae-style or Llama-style
  dense) as a ``MythosForCausalLM`` remote-code directory (``trust_remote_code=True``), with the
  same Hub files.
- CLI: ``python -m mythos.tools.export --run RUN_DIR [--checkpoint latest|TAG] --out DIR [--hf-llama |
  --hf] [--tokenizer PATH]`` (or ``--checkpoint RUN_DIR/checkpoints/TAG`` without ``--run``; the tag is
  resolved like eval's, :func:`mythos.cli_common.resolve_checkpoint`) consolidates a DeepSpeed
  checkpoint (ZeRO 1-3 shards via ``zero_to_fp32``; without ZeRO shards the module weights in
  ``mp_rank_00_model_states.pt``) and writes one of the three layouts. ``--hf-llama`` / ``--hf``
  take the tokenizer the run's shards were built with (found and sha256-checked via ``data.shards``'s
  manifest) unless ``--tokenizer`` names one. Everything that needs no weights (the model
  options, the tokenizer, a writable ``--out`` that is not a file) is checked before the merge.

DeepSpeed's checkpoint files are pickles: they are read through :mod:`mythos.ds_checkpoint`
(``weights_only`` loads with a small allow-list; ``--trust-checkpoint`` turns that off -- load only
checkpoints you trust).

Files are written to a temporary name in the target directory and ``os.replace``-d into place
(atomic per file); the weights go first and the config last, so a directory with a config is
complete.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from mythos.cli_common import ArgumentParser, check_out_dir, fail, resolve_checkpoint
from mythos.config import ConfigError, from_dict, load_config, load_yaml, resolve_config_path
from mythos.data.tokenizer import Tokenizer
from mythos.ds_checkpoint import clean_state_dict, consolidate_deepspeed
from mythos.model.base import CausalLM
from mythos.model.config import ModelConfig
from mythos.run_dir import COMPLETE, EXPORTED_CONFIG, RESOLVED_CONFIG
from mythos.tools.hf.export import hf_incompatibilities, to_hf
from mythos.tools.hf.files import (
    HF_CONFIG_NAME,
    WEIGHTS_NAME,
    check_hf_tokenizer,
    write_hub_files,
    write_json,
)
from mythos.weights import save_consolidated, save_tensors

# ---------------------------------------------------------------------------------------------
# Hugging Face Llama (dense, Llama-style only)


def llama_incompatibilities(cfg: ModelConfig) -> list[str]:
    """Options of ``cfg`` that ``LlamaForCausalLM`` cannot represent (empty when exportable)."""
    bad = []
    if cfg.kind != "dense":
        bad.append(f"kind={cfg.kind}")
    if cfg.mlp != "swiglu":
        bad.append(f"mlp={cfg.mlp}")
    if cfg.qk_norm:
        bad.append("qk_norm=true")
    if cfg.value_embeds != "none":
        bad.append(f"value_embeds={cfg.value_embeds}")
    if not bad and not cfg.is_llama_style:  # a new option the list above does not know yet
        bad.append("is_llama_style=false")
    return bad


def hf_llama_config(cfg: ModelConfig, dtype: torch.dtype = torch.float32,
                    token_ids: Mapping[str, int] | None = None) -> dict:
    """``config.json`` contents. RoPE theta is written both as transformers 5's
    ``rope_parameters`` and as the legacy ``rope_theta`` (4.x), and the dtype as ``dtype`` (5.x)
    and ``torch_dtype`` (4.x), so either version reads the same model. ``token_ids``
    (``bos/eos/pad_token_id``, see :func:`mythos.tools.hf.tokenizer.token_ids`) are added when given."""
    dtype_name = str(dtype).removeprefix("torch.")
    return {
        **(token_ids or {}),
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rms_norm_eps": cfg.norm_eps,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "use_cache": True,
        "dtype": dtype_name,
        "torch_dtype": dtype_name,
    }


def hf_llama_state_dict(state_dict: Mapping[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Rename our dense parameters to HF Llama's. Every key must map (no silent drops)."""
    renames = {"attn.q_proj": "self_attn.q_proj", "attn.k_proj": "self_attn.k_proj",
               "attn.v_proj": "self_attn.v_proj", "attn.o_proj": "self_attn.o_proj",
               "mlp.gate_proj": "mlp.gate_proj", "mlp.up_proj": "mlp.up_proj",
               "mlp.down_proj": "mlp.down_proj", "attn_norm": "input_layernorm",
               "mlp_norm": "post_attention_layernorm"}
    out: dict[str, Tensor] = {}
    for key, value in clean_state_dict(state_dict).items():
        if key == "embed.weight":
            new = "model.embed_tokens.weight"
        elif key == "norm.weight":
            new = "model.norm.weight"
        elif key == "lm_head.weight":
            new = "lm_head.weight"
        elif key.startswith("layers."):
            _, idx, rest = key.split(".", 2)
            module, _, leaf = rest.rpartition(".")
            if module not in renames:
                raise ValueError(f"cannot map parameter '{key}' to HF Llama")
            new = f"model.layers.{idx}.{renames[module]}.{leaf}"
        else:
            raise ValueError(f"cannot map parameter '{key}' to HF Llama")
        out[new] = value
    expected = 2 + (0 if cfg.tie_embeddings else 1) + 9 * cfg.n_layers
    if len(out) != expected:
        raise ValueError(f"expected {expected} Llama tensors, got {len(out)}")
    return out


def to_hf_llama(model: CausalLM | None, out_dir: str | Path, *, dtype: torch.dtype = torch.float32,
                cfg: ModelConfig | None = None, state_dict: Mapping[str, Tensor] | None = None,
                tokenizer: Tokenizer | str | Path | None = None) -> Path:
    """Write ``model`` as a Hugging Face ``LlamaForCausalLM`` directory (``config.json`` +
    ``model.safetensors`` in ``dtype``); returns ``out_dir``. With ``tokenizer`` (a
    :class:`Tokenizer` or its ``tokenizer.model`` path) also the tokenizer files and
    ``generation_config.json``, and the token ids in ``config.json``.

    Raises ``ValueError`` (one line, naming the offending options) unless the model is a
    Llama-style dense model and the tokenizer can be written exactly. ``cfg``/``state_dict``
    default to the model's own (pass them to export consolidated weights without a live model:
    ``model`` may then be None).
    """
    cfg = cfg if cfg is not None else model.cfg
    bad = llama_incompatibilities(cfg)
    if bad:
        raise ValueError(
            f"cannot export '{cfg.name or cfg.kind}' to HF Llama: {', '.join(bad)} "
            "(needs kind=dense, mlp=swiglu, qk_norm=false, value_embeds=none)"
        )
    tok = tokenizer if tokenizer is None or isinstance(tokenizer, Tokenizer) else Tokenizer(tokenizer)
    if tok is not None:
        check_hf_tokenizer(tok, cfg)  # before anything is written
    sd = state_dict if state_dict is not None else model.state_dict()
    out = Path(out_dir)
    # weights, then tokenizer and generation config, config.json last: a directory with a
    # config.json is complete
    save_tensors(out / WEIGHTS_NAME, hf_llama_state_dict(sd, cfg), dtype)
    ids = write_hub_files(tok, cfg, out) if tok is not None else None
    write_json(out / HF_CONFIG_NAME, hf_llama_config(cfg, dtype, ids))
    return out


def run_tokenizer(run_config: str | Path) -> Tokenizer:
    """The tokenizer a run's shards were built with (``data.shards``, or a mixture's first
    source: all sources share one), found and sha256-checked via the shard manifest."""
    from mythos.data.format import load_manifest
    from mythos.data.tokenizer import find_tokenizer

    hint = "; pass --tokenizer PATH/tokenizer.model"
    raw = load_yaml(run_config)
    data = raw.get("data") or {}
    if isinstance(data, str):  # an include (config.yaml names configs/data/*.yaml)
        data = load_yaml(resolve_config_path(data, Path(run_config).parent, kind="data"))
    sources = data.get("sources") or []
    shards = data.get("shards") or (sources[0].get("shards") if sources and isinstance(sources[0], dict) else None)
    if not shards:
        raise FileNotFoundError(f"no data.shards in {run_config} to find the run's tokenizer{hint}")
    try:
        manifest = load_manifest(shards)
    except ConfigError as exc:
        raise FileNotFoundError(f"cannot find the run's tokenizer: {exc}{hint}") from None
    tok = find_tokenizer(manifest.raw, manifest.directory)
    if tok is None:
        raise FileNotFoundError(f"tokenizer of {shards} not found (manifest path "
                                f"{manifest.raw.get('tokenizer', {}).get('path')}, sha256-checked){hint}")
    return tok


def model_config_from_file(path: str | Path) -> ModelConfig:
    """A :class:`ModelConfig` from a model YAML, or from a run config's top-level ``model:``
    section (e.g. ``RUN_DIR/config.resolved.yaml``)."""
    path = Path(path)
    raw = load_yaml(path)
    if "model" in raw:
        return from_dict(ModelConfig, {"include": raw["model"]} if isinstance(raw["model"], str) else raw["model"],
                         source=path)
    return load_config(ModelConfig, path)


def _find_run_config(run_dir: Path) -> Path:
    for name in (RESOLVED_CONFIG, EXPORTED_CONFIG):
        if (run_dir / name).is_file():
            return run_dir / name
    raise FileNotFoundError(f"no config.resolved.yaml or config.yaml in {run_dir}; pass --model-config")


def build_parser() -> ArgumentParser:
    """The ``python -m mythos.tools.export`` / ``mythos-export`` argument parser."""
    parser = ArgumentParser(
        prog="mythos-export",
        description="Consolidate a DeepSpeed checkpoint to fp32 safetensors, or a Hugging Face directory.\n\n"
                    "    mythos-export --run RUN_DIR [--checkpoint latest|TAG] --out DIR [--hf | --hf-llama]\n"
                    "    mythos-export --checkpoint RUN_DIR/checkpoints/TAG --out DIR [--hf | --hf-llama]",
    )
    parser.add_argument("--run", default=None, metavar="DIR",
                        help="training run directory (with --checkpoint latest|TAG; omit it to pass --checkpoint PATH)")
    parser.add_argument("--checkpoint", default=None, metavar="TAG|latest|PATH",
                        help="tag under RUN/checkpoints, 'latest' (the newest complete one; the default with --run) "
                             "or a path RUN_DIR/checkpoints/TAG")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
    layout = parser.add_mutually_exclusive_group()
    layout.add_argument("--hf", action="store_true",
                        help="write a Hugging Face directory with its own modeling code (any model kind; load with "
                             "trust_remote_code=True)")
    layout.add_argument("--hf-llama", action="store_true",
                        help="write a Hugging Face LlamaForCausalLM directory (dense Llama-style only)")
    parser.add_argument("--model-config", help="model YAML or run config with a model: section "
                        "(default: RUN_DIR/config.resolved.yaml, then RUN_DIR/config.yaml)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="weight dtype for --hf / --hf-llama (consolidated output is always fp32)")
    parser.add_argument("--tokenizer", help="sentencepiece tokenizer.model (or its directory) for --hf / --hf-llama "
                        "(default: the one the run's data.shards were built with)")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="unpickle the checkpoint files without restriction (DeepSpeed's engine files are "
                        "pickles: only for checkpoints you trust)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.run is None and args.checkpoint is None:
        parser.error("give --run RUN_DIR [--checkpoint latest|TAG] or --checkpoint RUN_DIR/checkpoints/TAG")
    try:
        check_out_dir(args.out)  # first: a bad --out is one line before anything is read
        if args.run is not None and not Path(args.run).is_dir():
            raise FileNotFoundError(f"--run {args.run} is not a directory (a training run directory)")
        # the shared rule (eval, lm-eval adapter): latest | TAG under RUN/checkpoints | a path; a
        # partial save is exported with a warning rather than refused
        ckpt, _ = resolve_checkpoint(args.run, args.checkpoint, require_complete=False)
        if (ckpt / WEIGHTS_NAME).is_file():
            raise ValueError(f"{ckpt} is already an exported model directory (nothing to consolidate)")
        if not (ckpt / COMPLETE).is_file():  # the trainer's marker, written after every rank saved
            print(f"warning: {ckpt} has no COMPLETE marker; it may be a partial save", file=sys.stderr)
        run_dir = Path(args.run) if args.run is not None else ckpt.parent.parent  # RUN_DIR/checkpoints/TAG
        cfg = model_config_from_file(args.model_config or _find_run_config(run_dir))
        tok = None
        if args.hf_llama or args.hf:  # every check that needs no weights before the slow merge
            if args.hf_llama and (bad := llama_incompatibilities(cfg)):
                raise ValueError(f"cannot export to HF Llama: {', '.join(bad)} (--hf exports any model kind)")
            if args.hf and (bad := hf_incompatibilities(cfg)):
                raise ValueError(f"cannot export with --hf: {', '.join(bad)}")
            tok = Tokenizer(args.tokenizer) if args.tokenizer else run_tokenizer(_find_run_config(run_dir))
            check_hf_tokenizer(tok, cfg)
        sd = consolidate_deepspeed(ckpt, trust=args.trust_checkpoint)
        dtype = getattr(torch, args.dtype)
        if args.hf_llama:
            to_hf_llama(None, args.out, dtype=dtype, cfg=cfg, state_dict=sd, tokenizer=tok)
        elif args.hf:
            to_hf(None, args.out, dtype=dtype, cfg=cfg, state_dict=sd, tokenizer=tok)
        else:
            save_consolidated(sd, cfg, args.out)
    except (FileNotFoundError, ValueError, ConfigError) as exc:
        return fail(exc)
    layout = "HF Llama" if args.hf_llama else "HF (trust_remote_code)" if args.hf else "consolidated fp32"
    print(f"wrote {layout} model from {ckpt} to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
