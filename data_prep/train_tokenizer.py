"""Train a sentencepiece tokenizer on corpus files.

    python -m data_prep.train_tokenizer --input corpus/ --vocab-size 8192 --out tok/

Writes ``tok/tokenizer.model`` and ``tok/card.json`` (vocab size, special ids, model sha256,
inputs with sizes and sha256, all parameters). Fixed choices, and why:

- ids 0..3 are ``<unk> <s> </s> <pad>`` (unk/bos/eos as in Llama, pad reserved so a collator
  never has to invent one); user ``--special`` tokens follow as user-defined symbols.
- ``byte_fallback``: no input is ever ``<unk>``; ``normalization_rule_name=identity`` and no
  whitespace folding: ``decode(encode(text)) == text`` exactly, which the round-trip test and
  bits-per-byte accounting rely on. ``"\\n"`` is a user-defined symbol (training sentences are
  paragraphs, and without it every newline would cost a byte-fallback token).
- ``num_threads=1`` and a fixed sentencepiece RNG seed make training deterministic: the same
  inputs and flags give a byte-identical model (tested).
"""

from __future__ import annotations

import dataclasses
import io
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import sentencepiece as spm

from data_prep.common import (
    DataPrepError,
    atomic_write_bytes,
    atomic_write_json,
    describe_inputs,
    expand_inputs,
    run_cli,
    sha256_bytes,
)
from data_prep.sources import SourceOptions, iter_documents
from mythos.cli_common import ArgumentParser
from mythos.data.tokenizer import CARD_FILE, TOKENIZER_FILE

CARD_VERSION = 1
SPECIAL_IDS = {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": 3}
#: sentencepiece drops training sentences longer than this (bytes); longer paragraphs are fed
#: line by line instead.
MAX_SENTENCE_BYTES = 16384


@dataclasses.dataclass(frozen=True)
class TokenizerParams:
    vocab_size: int
    model_type: str = "bpe"
    sample_size: int = 0  # 0 = every sentence
    special: tuple[str, ...] = ()
    character_coverage: float = 1.0
    seed: int = 0
    text_field: str = "text"
    on_bad_utf8: str = "error"


def _sentences(files: Sequence[Path], opts: SourceOptions) -> Iterator[str]:
    for f in files:
        for doc in iter_documents(f, opts):
            if len(doc.encode("utf-8")) <= MAX_SENTENCE_BYTES:
                yield doc
            else:
                yield from (line for line in doc.split("\n") if line.strip())


def train_tokenizer(inputs: Sequence[str | Path], out_dir: str | Path, params: TokenizerParams) -> dict:
    """Train, then write ``tokenizer.model`` + ``card.json`` atomically; returns the card."""
    if params.vocab_size < 64:
        raise DataPrepError(f"--vocab-size {params.vocab_size} is too small (byte fallback alone needs 260)")
    files = expand_inputs(inputs)
    opts = SourceOptions(text_field=params.text_field, on_bad_utf8=params.on_bad_utf8)  # type: ignore[arg-type]
    # Read everything once up front: bad input fails here, before sentencepiece starts, and an
    # empty corpus gets our message rather than sentencepiece's.
    sentences = list(_sentences(files, opts))
    if not sentences:
        raise DataPrepError(f"empty corpus: no documents in {', '.join(map(str, inputs))}")
    model = io.BytesIO()
    t0 = time.perf_counter()
    spm.set_random_generator_seed(params.seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=model,
            vocab_size=params.vocab_size,
            model_type=params.model_type,
            byte_fallback=True,
            character_coverage=params.character_coverage,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            user_defined_symbols=["\n", *params.special],
            input_sentence_size=params.sample_size,
            shuffle_input_sentence=params.sample_size > 0,
            max_sentence_length=MAX_SENTENCE_BYTES,
            num_threads=1,
            minloglevel=2,
            **SPECIAL_IDS,
        )
    except RuntimeError as exc:  # e.g. "Vocabulary size too high": one line, with the advice
        msg = str(exc).strip().splitlines()[-1]
        raise DataPrepError(f"sentencepiece failed: {msg} (try a smaller --vocab-size or more text)") from None
    seconds = time.perf_counter() - t0
    data = model.getvalue()
    sp = spm.SentencePieceProcessor(model_proto=data)
    card = {
        "card_version": CARD_VERSION,
        "file": TOKENIZER_FILE,
        "sha256": sha256_bytes(data),
        "vocab_size": sp.get_piece_size(),
        "model_type": params.model_type,
        **{k: getattr(sp, k)() for k in SPECIAL_IDS},
        "special_tokens": {tok: sp.piece_to_id(tok) for tok in params.special},
        "params": dataclasses.asdict(params),
        "inputs": describe_inputs(files),
        "num_sentences": len(sentences),
        "train_seconds": round(seconds, 3),
        "sentencepiece_version": spm.__version__,
    }
    out = Path(out_dir)
    # Model first, card second: a card always describes the model beside it (its sha256 says so).
    atomic_write_bytes(out / TOKENIZER_FILE, data)
    atomic_write_json(out / CARD_FILE, card)
    return card


def build_parser() -> ArgumentParser:
    """The ``mythos-tokenizer`` / ``python -m data_prep.train_tokenizer`` argument parser."""
    p = ArgumentParser(prog="mythos-tokenizer", description=__doc__.split("\n")[0])
    p.add_argument("--input", nargs="+", required=True, help="text/jsonl(.gz) files or directories")
    p.add_argument("--vocab-size", type=int, required=True, help="vocabulary size, special tokens included")
    p.add_argument("--out", required=True, help="output directory (tokenizer.model, card.json)")
    p.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe", help="sentencepiece model type")
    p.add_argument("--sample-size", type=int, default=0, help="max training sentences (0 = all)")
    p.add_argument("--special", nargs="*", default=[], help="extra user-defined special tokens")
    p.add_argument("--character-coverage", type=float, default=1.0,
                   help="fraction of characters covered by the vocab (the rest byte-fallback)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sentence sample")
    p.add_argument("--text-field", default="text", help="JSON field holding the text (jsonl inputs)")
    p.add_argument("--on-bad-utf8", choices=("error", "replace", "skip"), default="error",
                   help="invalid UTF-8 input: stop, replace the bad bytes, or skip the document")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    params = TokenizerParams(
        vocab_size=a.vocab_size,
        model_type=a.model_type,
        sample_size=a.sample_size,
        special=tuple(a.special),
        character_coverage=a.character_coverage,
        seed=a.seed,
        text_field=a.text_field,
        on_bad_utf8=a.on_bad_utf8,
    )
    card = train_tokenizer(a.input, a.out, params)
    print(
        f"wrote {Path(a.out) / TOKENIZER_FILE} (vocab {card['vocab_size']}, sha256 {card['sha256'][:12]}, "
        f"{card['num_sentences']} sentences, {card['train_seconds']:.1f}s)"
    )
    return 0


def cli() -> int:
    """Console-script entry (``mythos-tokenizer``): :func:`main` with one-line errors."""
    return run_cli(main)


if __name__ == "__main__":
    sys.exit(cli())
