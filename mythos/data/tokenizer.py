"""A thin sentencepiece wrapper: encode/decode, special ids, and bytes-per-token statistics.

Bytes per token converts a per-token loss into bits per byte (tokenizer-independent, so runs
with different vocabularies compare): ``bpb = loss_nats_per_token / ln 2 / bytes_per_token``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

TOKENIZER_FILE = "tokenizer.model"
CARD_FILE = "card.json"


def resolve_tokenizer_path(path: str | Path) -> Path:
    """``DIR`` (holding ``tokenizer.model``) or a ``.model`` file -> the model file path."""
    p = Path(path)
    if p.is_dir():
        p = p / TOKENIZER_FILE
    if not p.is_file():
        raise FileNotFoundError(f"tokenizer not found: {p} (train one with `python -m data_prep.train_tokenizer`)")
    return p


class Tokenizer:
    """A sentencepiece model plus its identity (sha256 of the model file)."""

    def __init__(self, path: str | Path):
        self.path = resolve_tokenizer_path(path)
        data = self.path.read_bytes()
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.sp = spm.SentencePieceProcessor(model_proto=data)
        self.vocab_size: int = self.sp.get_piece_size()
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        self.pad_id: int = self.sp.pad_id()
        self.unk_id: int = self.sp.unk_id()

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no BOS/EOS added)."""
        return self.sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.sp.encode(list(texts), num_threads=1)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; control ids (BOS/EOS/PAD) decode to nothing."""
        return self.sp.decode([int(i) for i in ids])

    def bytes_per_token(self, texts: Iterable[str]) -> float:
        """Mean UTF-8 bytes per token over ``texts`` (no EOS counted)."""
        n_bytes = n_tok = 0
        for t in texts:
            n_bytes += len(t.encode("utf-8"))
            n_tok += len(self.sp.encode(t))
        if n_tok == 0:
            raise ValueError("bytes_per_token: no tokens in the given texts")
        return n_bytes / n_tok


def bits_per_byte(loss_nats_per_token: float, bytes_per_token: float) -> float:
    """Convert a mean cross-entropy (nats/token) to bits per UTF-8 byte."""
    return loss_nats_per_token / math.log(2) / bytes_per_token
