"""Reading documents out of corpus files.

What a *document* is (it matters: documents are the unit of the train/val split and are joined
with EOS when packed):

- ``.jsonl`` / ``.jsonl.gz``: one JSON object per line; the document is its ``text_field`` value.
  Blank lines are ignored; a line that is not an object with a string field is an error naming
  the file and line number.
- plain text (``.txt``, ``.md``, ``.txt.gz``, anything else): with ``plain_docs="paragraph"``
  (default) a document is a run of non-blank lines; one or more blank (whitespace-only) lines
  separate documents. The document text is its lines verbatim, joined by ``\\n``, without the
  final newline. With ``plain_docs="file"`` the whole file is one document (verbatim).
  Paragraphs suit literary prose (a speech, a verse, a paragraph) and give the val split enough
  documents to draw from; whole files suit corpora that are one article per file.

Bytes are decoded as strict UTF-8. On invalid bytes ``on_bad_utf8`` decides: ``error`` (the
message names the file and byte offset, counted in the *decompressed* stream for ``.gz``),
``replace`` (U+FFFD for each bad byte run), or ``skip`` (drop the whole document/line).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Literal

from data_prep.common import DataPrepError

BadUtf8 = Literal["error", "replace", "skip"]
PlainDocs = Literal["paragraph", "file"]


@dataclasses.dataclass(frozen=True)
class SourceOptions:
    text_field: str = "text"
    on_bad_utf8: BadUtf8 = "error"
    plain_docs: PlainDocs = "paragraph"


@dataclasses.dataclass
class SourceStats:
    documents: int = 0
    skipped_bad_utf8: int = 0
    replaced_bad_utf8: int = 0


def _open_binary(path: Path) -> BinaryIO:
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")  # noqa: SIM115


def is_jsonl(path: Path) -> bool:
    return path.name.endswith((".jsonl", ".jsonl.gz"))


def _decode(raw: bytes, path: Path, offset: int, opts: SourceOptions, stats: SourceStats) -> str | None:
    """Strict UTF-8 decode; on failure apply the policy. ``None`` means: skip this document."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        if opts.on_bad_utf8 == "replace":
            stats.replaced_bad_utf8 += 1
            return raw.decode("utf-8", errors="replace")
        if opts.on_bad_utf8 == "skip":
            stats.skipped_bad_utf8 += 1
            return None
        gz = " of the decompressed stream" if path.name.endswith(".gz") else ""
        raise DataPrepError(
            f"{path}: invalid UTF-8 at byte offset {offset + exc.start}{gz} "
            f"(fix the file or pass --on-bad-utf8 replace|skip)"
        ) from None


def _iter_jsonl(path: Path, opts: SourceOptions, stats: SourceStats) -> Iterator[str]:
    offset = 0
    with _open_binary(path) as f:
        for lineno, raw in enumerate(f, start=1):
            start, offset = offset, offset + len(raw)
            if not raw.strip():
                continue
            line = _decode(raw, path, start, opts, stats)
            if line is None:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataPrepError(f"{path}:{lineno}: invalid JSON ({exc.msg}); fix or remove the line") from None
            if not isinstance(obj, dict) or opts.text_field not in obj:
                raise DataPrepError(
                    f"{path}:{lineno}: no '{opts.text_field}' field in this JSON line "
                    f"(pass --text-field NAME or fix the line)"
                )
            text = obj[opts.text_field]
            if not isinstance(text, str):
                raise DataPrepError(
                    f"{path}:{lineno}: field '{opts.text_field}' is {type(text).__name__}, expected a string"
                )
            if text:
                yield text


def _iter_plain(path: Path, opts: SourceOptions, stats: SourceStats) -> Iterator[str]:
    with _open_binary(path) as f:
        if opts.plain_docs == "file":
            raw = f.read()
            text = _decode(raw, path, 0, opts, stats) if raw.strip() else None
            if text is not None:
                yield text
            return
        # Paragraph mode, streamed line by line. Splitting on b"\n" before decoding is safe:
        # 0x0A never occurs inside a multi-byte UTF-8 sequence.
        lines: list[bytes] = []
        doc_start = offset = 0
        for raw in f:
            if raw.strip():
                if not lines:
                    doc_start = offset
                lines.append(raw)
            elif lines:
                text = _decode(b"".join(lines).removesuffix(b"\n"), path, doc_start, opts, stats)
                if text is not None:
                    yield text
                lines = []
            offset += len(raw)
        if lines:
            text = _decode(b"".join(lines).removesuffix(b"\n"), path, doc_start, opts, stats)
            if text is not None:
                yield text


def iter_documents(path: Path, opts: SourceOptions, stats: SourceStats | None = None) -> Iterator[str]:
    """Yield the documents of one file in order (see the module docstring for the definition)."""
    stats = stats if stats is not None else SourceStats()
    try:
        reader = _iter_jsonl if is_jsonl(path) else _iter_plain
        for doc in reader(path, opts, stats):
            stats.documents += 1
            yield doc
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataPrepError(f"{path}: cannot read ({exc}); check the file") from None
