"""Reading documents out of corpus files.

What a *document* is (it matters: documents are the unit of the train/val split and are joined
with EOS when packed):

- ``.jsonl`` / ``.jsonl.gz`` / ``.jsonl.zst``: one JSON object per line; the document is its
  ``text_field`` value. Blank lines are ignored; a line that is not an object with a string field
  is an error naming the file and line number.
- ``.parquet`` (FineWeb style): one document per row, the string column ``text_field``; read one
  row group at a time with pyarrow (only that column), never the whole file. Null and empty
  values are skipped; a missing or non-string column is an error naming the file. Arrow strings
  are UTF-8 by construction, so ``on_bad_utf8`` does not apply.
- plain text (``.txt``, ``.md``, ``.txt.gz``, ``.txt.zst``, anything else): with ``plain_docs="paragraph"``
  (default) a document is a run of non-blank lines; one or more blank (whitespace-only) lines
  separate documents. The document text is its lines verbatim, joined by ``\\n``, without the
  final newline. With ``plain_docs="file"`` the whole file is one document (verbatim).
  Paragraphs suit literary prose (a speech, a verse, a paragraph) and give the val split enough
  documents to draw from; whole files suit corpora that are one article per file.

**Spans** (for partitioned builds, :mod:`data_prep.partition`): a large uncompressed jsonl or
plain-text file can be read as byte ranges ``[start, end)``; a range owns exactly the documents
whose *first byte* lies in it (a jsonl line start; a paragraph's first non-blank line after a
blank line or the file start) and reads each of them to its end, even past ``end``. The ranges
of a file therefore yield, in order, exactly the documents of the whole file. A parquet span is a
range of row groups. Compressed files cannot seek and are always read whole.

Bytes are decoded as strict UTF-8. On invalid bytes ``on_bad_utf8`` decides: ``error`` (the
message names the file and byte offset, counted in the *decompressed* stream for ``.gz``),
``replace`` (U+FFFD for each bad byte run), or ``skip`` (drop the whole document/line).
"""

from __future__ import annotations

import dataclasses
import gzip
import io
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


#: Suffixes of compressed streams (read whole, sequentially; no byte-range spans).
COMPRESSED_SUFFIXES = (".gz", ".zst")


def _open_binary(path: Path) -> BinaryIO:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    if path.name.endswith(".zst"):
        import zstandard  # optional dependency: only needed for .zst inputs

        raw = open(path, "rb")  # noqa: SIM115 -- closed with the reader (closefd)
        # read_across_frames: files written by `zstd` concatenations hold several frames
        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=True)
        return io.BufferedReader(reader, 1 << 20)  # type: ignore[arg-type]
    return open(path, "rb")  # noqa: SIM115


def is_jsonl(path: Path) -> bool:
    return path.name.endswith((".jsonl", ".jsonl.gz", ".jsonl.zst"))


def is_parquet(path: Path) -> bool:
    return path.name.endswith(".parquet")


def is_compressed(path: Path) -> bool:
    return path.name.endswith(COMPRESSED_SUFFIXES)


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
        gz = " of the decompressed stream" if is_compressed(path) else ""
        raise DataPrepError(
            f"{path}: invalid UTF-8 at byte offset {offset + exc.start}{gz} "
            f"(fix the file or pass --on-bad-utf8 replace|skip)"
        ) from None


def _seek_line_start(f: BinaryIO, start: int) -> int:
    """Position ``f`` at the first line start ``>= start`` and return it (``start > 0``): the line
    holding byte ``start - 1`` belongs to an earlier range (Hadoop's line-split rule)."""
    f.seek(start - 1)
    return start - 1 + len(f.readline())


def _prev_line_blank(f: BinaryIO, pos: int) -> bool:
    """Whether the line ending at ``pos - 1`` (a ``\\n``) is blank, scanning backwards in blocks."""
    end = pos - 1  # the newline itself
    while end > 0:
        begin = max(0, end - 65536)
        f.seek(begin)
        block = f.read(end - begin)
        for b in reversed(block):
            if b == 0x0A:
                return True
            if b not in b" \t\r\x0b\x0c":
                return False
        end = begin
    return True


def _iter_jsonl(
    path: Path, opts: SourceOptions, stats: SourceStats, start: int = 0, end: int | None = None
) -> Iterator[str]:
    with _open_binary(path) as f:
        offset = _seek_line_start(f, start) if start > 0 else 0
        lineno = 0  # 1-based line numbers are known only when reading from the file start
        for raw in iter(f.readline, b""):
            if end is not None and offset >= end:
                break
            lineno += 1
            line_start, offset = offset, offset + len(raw)
            where = f"{path}:{lineno}" if start == 0 else f"{path}: line at byte {line_start}"
            if not raw.strip():
                continue
            line = _decode(raw, path, line_start, opts, stats)
            if line is None:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataPrepError(f"{where}: invalid JSON ({exc.msg}); fix or remove the line") from None
            if not isinstance(obj, dict) or opts.text_field not in obj:
                raise DataPrepError(
                    f"{where}: no '{opts.text_field}' field in this JSON line (pass --text-field NAME or fix the line)"
                )
            text = obj[opts.text_field]
            if not isinstance(text, str):
                raise DataPrepError(f"{where}: field '{opts.text_field}' is {type(text).__name__}, expected a string")
            if text:
                yield text


def _iter_parquet(
    path: Path, opts: SourceOptions, stats: SourceStats, start: int = 0, end: int | None = None
) -> Iterator[str]:
    """Rows ``text_field`` of row groups ``[start, end)``, streamed in record batches."""
    import pyarrow as pa  # optional dependency: only needed for parquet inputs
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, pa.ArrowIOError) as exc:
        raise DataPrepError(f"{path}: not a readable parquet file ({exc}); check the file") from None
    names = pf.schema_arrow.names
    if opts.text_field not in names:
        raise DataPrepError(
            f"{path}: no column '{opts.text_field}' (columns: {', '.join(names[:12])}); pass --text-field NAME"
        )
    col_type = pf.schema_arrow.field(opts.text_field).type
    if not (pa.types.is_string(col_type) or pa.types.is_large_string(col_type)):
        raise DataPrepError(f"{path}: column '{opts.text_field}' is {col_type}, expected a string column")
    stop = pf.num_row_groups if end is None else min(end, pf.num_row_groups)
    for rg in range(start, stop):
        # one row group at a time: memory is bounded by the largest row group's text column
        try:
            batches = list(pf.iter_batches(batch_size=4096, row_groups=[rg], columns=[opts.text_field]))
        except pa.ArrowException as exc:
            raise DataPrepError(f"{path}: row group {rg} is unreadable ({exc}); check the file") from None
        for batch in batches:
            for text in batch.column(0).to_pylist():
                if text:  # null or empty: no document
                    yield text


def _iter_plain(
    path: Path, opts: SourceOptions, stats: SourceStats, start: int = 0, end: int | None = None
) -> Iterator[str]:
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
        prev_blank = True  # a non-blank line after a blank one (or at the file start) starts a document
        if start > 0:
            offset = _seek_line_start(f, start)
            prev_blank = _prev_line_blank(f, offset)
            f.seek(offset)
        for raw in iter(f.readline, b""):
            blank = not raw.strip()
            if not blank:
                if lines:
                    lines.append(raw)
                elif prev_blank:  # a document starts here; it is ours iff it starts before `end`
                    if end is not None and offset >= end:
                        break
                    doc_start, lines = offset, [raw]
                # else: the tail of a document that started in an earlier range: not ours
            elif lines:
                text = _decode(b"".join(lines).removesuffix(b"\n"), path, doc_start, opts, stats)
                if text is not None:
                    yield text
                lines = []
            prev_blank = blank
            offset += len(raw)
        if lines:
            text = _decode(b"".join(lines).removesuffix(b"\n"), path, doc_start, opts, stats)
            if text is not None:
                yield text


def iter_documents(
    path: Path,
    opts: SourceOptions,
    stats: SourceStats | None = None,
    span: tuple[int, int | None] | None = None,
) -> Iterator[str]:
    """Yield the documents of one file in order (see the module docstring for the definition).

    ``span = (start, end)`` reads only the documents owned by that byte range (jsonl, plain text)
    or row-group range (parquet); ``None`` reads the whole file."""
    stats = stats if stats is not None else SourceStats()
    start, end = span if span is not None else (0, None)
    if (start or end is not None) and is_compressed(path) and not is_parquet(path):
        raise ValueError(f"{path}: compressed files cannot be read by byte range")
    try:
        reader = _iter_parquet if is_parquet(path) else _iter_jsonl if is_jsonl(path) else _iter_plain
        for doc in reader(path, opts, stats, start, end):
            stats.documents += 1
            yield doc
    except (OSError, EOFError, gzip.BadGzipFile, *_codec_errors()) as exc:
        raise DataPrepError(f"{path}: cannot read ({exc}); check the file") from None


def _codec_errors() -> tuple[type[Exception], ...]:
    """Decompression errors of the optional codecs that are installed (zstd's is no OSError)."""
    try:
        import zstandard

        return (zstandard.ZstdError,)
    except ImportError:
        return ()
