"""Our sentencepiece tokenizer as Hugging Face files that encode exactly like it.

:func:`write_hf_tokenizer` writes ``tokenizer.model`` (the sentencepiece file, for sentencepiece
users), ``tokenizer.json`` (the ``tokenizers`` pipeline transformers actually runs),
``tokenizer_config.json`` and ``special_tokens_map.json``. Written as plain JSON: exporting needs
neither ``transformers`` nor ``tokenizers``.

Why a hand-built ``tokenizer.json`` rather than ``LlamaTokenizer`` converting ``tokenizer.model``:
transformers' conversion puts the dummy prefix in a ``Metaspace`` pre-tokenizer, which prepends
``\u2581`` only when the text does not already start with one -- so ``" hello"`` loses a space
against sentencepiece, which always prepends (we train with ``remove_extra_whitespaces=false``) --
and it splits user-defined symbols (our ``"\\n"``) out before the prefix, so ``"\\nX"`` loses the
prefix token. Here the prefix is a ``Prepend`` normalizer over the whole text, there is no
pre-tokenizer, ``"\\n"`` is an ordinary base symbol that no merge touches (so it stays atomic, as
sentencepiece's user-defined symbols do), and the BPE merges are ranked by sentencepiece's piece
scores. Checked against sentencepiece on whole Shakespeare plays and fuzzed strings (tests).
Decoding differs only on byte-fallback runs that are not valid UTF-8 (sentencepiece emits one
U+FFFD per bad sequence and keeps the valid bytes, ``tokenizers`` turns every byte of the run
into one). ``tokenizer_class`` is
``PreTrainedTokenizerFast`` because a model-specific class (``LlamaTokenizer``) rebuilds its own
pipeline and would drop this one.

BOS: training data is packed ``doc EOS doc EOS`` with no BOS, so EOS is what the model saw before
every document. The HF files therefore say ``bos_token = eos_token = "</s>"`` (as GPT-2 does) with
``add_bos_token=false``: nothing is added when encoding, and tools that start from "the BOS"
(lm-eval's empty-context prefix, ``generate()`` without a prompt) start from EOS, as our own
evaluation does. ``split_special_tokens=true``: sentencepiece reads ``"</s>"`` in text as five
characters, so the HF tokenizer does too.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from sentencepiece import sentencepiece_model_pb2

from mythos.data.tokenizer import TOKENIZER_FILE, Tokenizer
from mythos.io import atomic_write

HF_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
_SPACE = "\u2581"
# sentencepiece ModelProto.SentencePiece.Type
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_BPE = 2  # TrainerSpec.ModelType


def _proto(tok: Tokenizer) -> sentencepiece_model_pb2.ModelProto:
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tok.path.read_bytes())
    return proto


def unsupported_options(tok: Tokenizer) -> list[str]:
    """sentencepiece options the ``tokenizer.json`` below cannot reproduce exactly (empty when
    exportable). ``data_prep.train_tokenizer`` with ``--model-type bpe`` (the default) qualifies."""
    proto = _proto(tok)
    ns, ts = proto.normalizer_spec, proto.trainer_spec
    bad = []
    if ts.model_type != _BPE:
        bad.append(f"model_type={sentencepiece_model_pb2.TrainerSpec.ModelType.Name(ts.model_type).lower()}")
    if not ts.byte_fallback:
        bad.append("byte_fallback=false")
    if ns.name != "identity" or ns.precompiled_charsmap:
        bad.append(f"normalization={ns.name}")
    if ns.remove_extra_whitespaces:
        bad.append("remove_extra_whitespaces=true")
    if not ns.escape_whitespaces or ts.treat_whitespace_as_suffix:
        bad.append("escape_whitespaces=false or treat_whitespace_as_suffix=true")
    if tok.eos_id < 0:
        bad.append("no eos piece")
    # tokenizer.json has no pre-tokenizer (see tokenizer_json): exact only if no piece could
    # merge across sentencepiece's word split, i.e. none has a non-space followed by a space
    crossing = [p.piece for p in proto.pieces if p.type == _NORMAL and p.piece.lstrip(_SPACE).find(_SPACE) > 0]
    if ts.split_by_whitespace and crossing:
        bad.append(f"pieces spanning words {crossing[:3]}")
    # A multi-character user-defined symbol would have to be an added token, and tokenizers
    # applies the dummy-prefix normalizer to added tokens' text too (or, unnormalized, restarts
    # the prefix after each one): neither matches sentencepiece. One character (our "\n") needs
    # no added token: it is a base symbol that no merge touches, so it stays atomic.
    multi = [p.piece for p in proto.pieces if p.type == _USER_DEFINED and len(p.piece) > 1]
    if multi:
        bad.append(f"multi-character user-defined symbols {multi[:3]}")
    return bad


def _merges(proto: sentencepiece_model_pb2.ModelProto, vocab: dict[str, int]) -> list[list[str]]:
    """Every (left, right) split of a normal piece into two normal pieces, in sentencepiece's
    priority order: its BPE merges the adjacent pair whose *concatenation* has the highest score,
    so every split of one piece shares that piece's rank (ties: lower left id, then right id)."""
    normal = {p.piece for p in proto.pieces if p.type == _NORMAL}
    ranked = []
    for pid, p in enumerate(proto.pieces):
        if p.type != _NORMAL or len(p.piece) < 2:
            continue
        for cut in range(1, len(p.piece)):
            left, right = p.piece[:cut], p.piece[cut:]
            if left in normal and right in normal:
                ranked.append((-p.score, pid, vocab[left], vocab[right], left, right))
    ranked.sort()
    return [[left, right] for *_, left, right in ranked]


def tokenizer_json(tok: Tokenizer) -> dict:
    """The ``tokenizers`` serialization (format 1.0, merges as pairs: tokenizers >= 0.20)."""
    bad = unsupported_options(tok)
    if bad:
        raise ValueError(f"cannot write a HF tokenizer for {tok.path}: unsupported sentencepiece options "
                         f"{', '.join(bad)} (train it with data_prep.train_tokenizer --model-type bpe)")
    proto = _proto(tok)
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    added = []
    for i, p in enumerate(proto.pieces):
        if p.type in (_UNKNOWN, _CONTROL):  # <unk> <s> </s> <pad>: never produced from text
            added.append({"id": i, "content": p.piece, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True})
    dummy = proto.normalizer_spec.add_dummy_prefix
    normalizers = [{"type": "Prepend", "prepend": _SPACE}] if dummy else []  # Prepend skips empty text
    normalizers.append({"type": "Replace", "pattern": {"String": " "}, "content": _SPACE})
    decoders = [{"type": "Replace", "pattern": {"String": _SPACE}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"}]
    if dummy:  # sentencepiece's decode drops the dummy prefix's space
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        # sentencepiece splits words before each space run; no piece has a non-space followed by
        # "▁", so no merge can cross such a boundary and splitting would change nothing
        "pre_tokenizer": None,
        # add nothing: no BOS in our packing, EOS only between documents. Explicit, because this
        # (not tokenizer_config's add_bos_token, which PreTrainedTokenizerFast ignores) is what
        # decides, in transformers 4 and 5 and for plain `tokenizers` users alike
        "post_processor": {"type": "TemplateProcessing", "single": [{"Sequence": {"id": "A", "type_id": 0}}],
                           "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                           "special_tokens": {}},
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": proto.pieces[tok.unk_id].piece if tok.unk_id >= 0 else None,
            "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
            "byte_fallback": True, "ignore_merges": False, "vocab": vocab, "merges": _merges(proto, vocab),
        },
    }


def special_tokens(tok: Tokenizer) -> dict[str, str]:
    """``bos/eos/unk/pad`` token strings; BOS is EOS (see the module docstring)."""
    piece = tok.sp.id_to_piece
    out = {"bos_token": piece(tok.eos_id), "eos_token": piece(tok.eos_id)}
    if tok.unk_id >= 0:
        out["unk_token"] = piece(tok.unk_id)
    if tok.pad_id >= 0:
        out["pad_token"] = piece(tok.pad_id)
    return out


def token_ids(tok: Tokenizer) -> dict[str, int]:
    """``bos/eos/pad_token_id`` for ``config.json`` and ``generation_config.json``."""
    out = {"bos_token_id": tok.eos_id, "eos_token_id": tok.eos_id}
    if tok.pad_id >= 0:
        out["pad_token_id"] = tok.pad_id
    return out


def write_hf_tokenizer(tok: Tokenizer, out_dir: str | Path, *, max_length: int) -> Path:
    """Write the four files of :data:`HF_TOKENIZER_FILES` (each atomically) to ``out_dir``."""
    out = Path(out_dir)
    spec = tokenizer_json(tok)  # validates before anything is written
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special_tokens(tok),
        "add_bos_token": False,  # informative: tokenizer.json's post-processor is what adds nothing
        "add_eos_token": False,
        "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
        "padding_side": "right",
    }
    atomic_write(out / TOKENIZER_FILE, lambda p: shutil.copyfile(tok.path, p))
    for name, data in (("tokenizer.json", spec), ("tokenizer_config.json", config),
                       ("special_tokens_map.json", special_tokens(tok))):
        text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
        atomic_write(out / name, lambda p, text=text: p.write_text(text, encoding="utf-8"))
    return out
