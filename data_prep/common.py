"""Shared helpers for the data-prep CLIs: one-line errors, atomic writes, hashing, input discovery."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

# re-exported: the data_prep tools write and hash through these (defined in the library, which
# writes shards and task cards the same way)
from mythos.io import (  # noqa: F401
    atomic_write_bytes,
    atomic_write_json,
    canonical_json,
    sha256_bytes,
    sha256_file,
)

#: Suffixes we know how to read (see :mod:`data_prep.sources`); anything else in a directory is
#: skipped (so a corpus directory may hold READMEs, licences, checksums, ...).
TEXT_SUFFIXES = (
    ".txt",
    ".txt.gz",
    ".txt.zst",
    ".md",
    ".md.gz",
    ".md.zst",
    ".jsonl",
    ".jsonl.gz",
    ".jsonl.zst",
    ".text",
    ".parquet",
)


class DataPrepError(Exception):
    """A user-facing failure. ``str(exc)`` is one line naming the file/key/shard and what to do."""


def expand_inputs(paths: Sequence[str | Path]) -> list[Path]:
    """Files named on the command line, with directories expanded recursively in sorted order.

    The order is part of the output's identity (documents are packed in this order), so it must
    not depend on the file system: directories are walked with sorted names. Explicit files keep
    the order given. A missing path is an error; a directory without readable files is an error."""
    if not paths:
        raise DataPrepError("no --input given (pass one or more files or directories)")
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_file():
            out.append(p)
        elif p.is_dir():
            found = sorted(
                (f for f in p.rglob("*") if f.is_file() and f.name.endswith(TEXT_SUFFIXES)),
                key=lambda f: f.relative_to(p).as_posix(),
            )
            if not found:
                raise DataPrepError(f"input directory {p} holds no {'/'.join(TEXT_SUFFIXES)} files (check the path)")
            out.extend(found)
        else:
            raise DataPrepError(f"input not found: {p} (check the path; nothing was written)")
    return out


def describe_inputs(files: Iterable[Path]) -> list[dict[str, Any]]:
    """``[{path, bytes, sha256}]`` for a card/manifest (paths as given, not resolved)."""
    return [{"path": f.as_posix(), "bytes": f.stat().st_size, "sha256": sha256_file(f)} for f in files]


def run_cli(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run a CLI ``main``; turn :class:`DataPrepError` (and Ctrl-C) into one stderr line + exit code."""
    try:
        return main(argv)
    except DataPrepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "error: interrupted (completed shards are kept; re-run the same command to resume)",
            file=sys.stderr,
        )
        return 130
