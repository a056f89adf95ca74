"""A closed word-level vocabulary, saved as a real sentencepiece model.

Task sequences are whitespace-separated words from a fixed list (``E12``, ``R3``, ``=``, ...).
Rather than invent a second tokenizer format, the vocabulary is written as a sentencepiece
``WORD`` model whose pieces are exactly ``<unk> <s> </s> <pad>`` (ids 0..3, the same special ids
as :mod:`data_prep.train_tokenizer`) followed by ``"\u2581" + word`` for each word, in order. So
the task shards carry an ordinary ``tokenizer.model`` (sha256 in the manifest), and everything
that loads a tokenizer -- :class:`mythos.data.Tokenizer`, the lm-eval adapter, ``decode`` for
debugging -- works unchanged. ``encode(" ".join(words))`` gives exactly one id per word.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from sentencepiece import sentencepiece_model_pb2 as pb

SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
_WS = "\u2581"  # sentencepiece's whitespace marker


class WordVocab:
    """Word <-> id for a closed vocabulary. Ids ``0..3`` are the specials; word ``i`` has id ``4 + i``."""

    def __init__(self, words: Sequence[str]) -> None:
        if len(set(words)) != len(words):
            raise ValueError("vocabulary words must be unique")
        bad = [w for w in words if not w or any(c.isspace() for c in w) or w in SPECIALS]
        if bad:
            raise ValueError(f"vocabulary word {bad[0]!r} is empty, has whitespace or is a special token")
        self.words = tuple(words)
        self.ids = {w: i + len(SPECIALS) for i, w in enumerate(self.words)}

    def __len__(self) -> int:
        """Vocabulary size including the 4 specials."""
        return len(SPECIALS) + len(self.words)

    def encode(self, words: Iterable[str]) -> list[int]:
        try:
            return [self.ids[w] for w in words]
        except KeyError as exc:
            raise ValueError(f"word {exc.args[0]!r} is not in the task vocabulary") from None

    def decode(self, ids: Iterable[int]) -> list[str]:
        n = len(SPECIALS)
        return [SPECIALS[i] if i < n else self.words[i - n] for i in ids]

    def sentencepiece_model(self) -> bytes:
        """Serialized sentencepiece ``ModelProto`` with exactly this vocabulary (deterministic bytes)."""
        m = pb.ModelProto()
        spec = m.trainer_spec
        spec.model_type = pb.TrainerSpec.WORD
        spec.vocab_size = len(self)
        spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = UNK_ID, BOS_ID, EOS_ID, PAD_ID
        spec.byte_fallback = False
        norm = m.normalizer_spec
        norm.name = "identity"
        norm.add_dummy_prefix = True
        norm.remove_extra_whitespaces = True
        norm.escape_whitespaces = True
        kinds = (pb.ModelProto.SentencePiece.UNKNOWN,) + (pb.ModelProto.SentencePiece.CONTROL,) * 3
        for piece, kind in zip(SPECIALS, kinds):
            p = m.pieces.add()
            p.piece, p.type, p.score = piece, kind, 0.0
        for w in self.words:
            p = m.pieces.add()
            p.piece, p.type, p.score = _WS + w, pb.ModelProto.SentencePiece.NORMAL, 0.0
        return m.SerializeToString(deterministic=True)
