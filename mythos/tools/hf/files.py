"""What every export layout writes: file names, atomic writers, the Hub files (tokenizer and
``generation_config.json``) and the output-directory check. Used by :mod:`mythos.tools.export`
(consolidated, ``--hf-llama``) and :mod:`mythos.tools.hf.export` (``--hf``)."""

from __future__ import annotations

import json
from pathlib import Path

from mythos.data.tokenizer import Tokenizer
from mythos.io import atomic_write
from mythos.model.config import ModelConfig
from mythos.run_dir import EXPORTED_WEIGHTS
from mythos.tools.hf.tokenizer import token_ids, tokenizer_json, write_hf_tokenizer

WEIGHTS_NAME = EXPORTED_WEIGHTS
HF_CONFIG_NAME = "config.json"
HF_GENERATION_CONFIG_NAME = "generation_config.json"


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_json(path: Path, obj: object) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def check_hf_tokenizer(tok: Tokenizer, cfg: ModelConfig) -> None:
    """``ValueError`` (one line) unless ``tok`` fits the model and can be written exactly."""
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"tokenizer {tok.path} has {tok.vocab_size} tokens but the model's vocab_size "
                         f"is {cfg.vocab_size} (is it the run's tokenizer?)")
    tokenizer_json(tok)


def hf_generation_config(cfg: ModelConfig, tok: Tokenizer) -> dict:
    """``generation_config.json``: the tokenizer's ids (BOS = EOS, see :mod:`mythos.tools.hf.tokenizer`)
    and the trained context length as ``max_length``."""
    return {**token_ids(tok), "max_length": cfg.max_seq_len}


def write_hub_files(tok: Tokenizer, cfg: ModelConfig, out: Path) -> dict[str, int]:
    """The tokenizer files and ``generation_config.json``; returns the token ids for ``config.json``."""
    write_hf_tokenizer(tok, out, max_length=cfg.max_seq_len)
    write_json(out / HF_GENERATION_CONFIG_NAME, hf_generation_config(cfg, tok))
    return token_ids(tok)
