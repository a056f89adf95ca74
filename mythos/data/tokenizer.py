"""A thin sentencepiece wrapper: encode/decode, special ids, and bytes-per-token statistics.

Bytes per token converts a per-token loss into bits per byte (tokenizer-independent, so runs
with different vocabularies compare): ``bpb = loss_nats_per_token / ln 2 / bytes_per_token``.

**Exact bytes per token** (:meth:`Tokenizer.byte_lengths`): a piece decodes to its text with
``\u2581`` read as a space, a byte-fallback piece to 1 byte, a control/unknown piece to 0 bytes.
Summed over a document's tokens this is the document's UTF-8 length **plus one** when the model
adds sentencepiece's dummy prefix (the leading ``\u2581`` that ``decode`` strips). So a label
token that starts a document -- its input token is EOS, because shards join ``doc EOS doc`` --
counts one byte less, and the sum over any stretch of labels is exactly the text bytes they
cover (tested). :class:`mythos.train.evaluate.TokenBytes` applies this rule on device.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

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

    def byte_lengths(self) -> tuple[np.ndarray, bool]:
        """``(bytes [vocab] int64, dummy_prefix)``: UTF-8 bytes each id decodes to inside a text
        (see the module docstring), and whether encoding adds the dummy prefix space."""
        sp = self.sp
        out = np.zeros(self.vocab_size, dtype=np.int64)
        for i in range(self.vocab_size):
            if sp.is_control(i) or sp.is_unknown(i):
                continue
            out[i] = 1 if sp.is_byte(i) else len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(self.path.read_bytes())
        return out, bool(proto.normalizer_spec.add_dummy_prefix)

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


def find_tokenizer(manifest_raw: dict, manifest_dir: str | Path) -> Tokenizer | None:
    """The tokenizer a shard manifest was built with, or None when it cannot be found.

    The manifest records the path used at shard time (often repo-relative, e.g.
    ``data/demo/tokenizer/tokenizer.model``); it is tried as given, relative to the repository,
    relative to the shard directory and as ``<shards>/../tokenizer``. A candidate counts only if
    its sha256 equals the manifest's (a different tokenizer would give wrong byte counts)."""
    from mythos.config import REPO_ROOT

    info = manifest_raw.get("tokenizer", {})
    rec = Path(info.get("path", TOKENIZER_FILE))
    base = Path(manifest_dir)
    for cand in (rec, REPO_ROOT / rec, base / rec, base / rec.name, base.parent / "tokenizer" / TOKENIZER_FILE):
        if cand.is_file() and hashlib.sha256(cand.read_bytes()).hexdigest() == info.get("sha256"):
            return Tokenizer(cand)
    return None
