"""The output directory of a shard build: build identity, the "up to date" check, manifests.

A build is identified by its *build key*: the sha256 of the canonical JSON of every
output-affecting parameter, the tokenizer sha256 and the input identities (:func:`build_record`).
While a build runs, ``.build.json`` (:data:`BUILD_MARKER`) holds that record; ``manifest.json`` is
written last. :func:`start_build` is the one entry for both build paths (classic and partitioned):
it refuses a directory that holds another build's shards (unless ``--overwrite``), returns the
existing manifest when every shard it lists is intact ("up to date"), and otherwise claims the
directory for this build.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm

from data_prep.common import DataPrepError, atomic_write_json, canonical_json, sha256_bytes
from data_prep.packing import BuildContext, PackResult
from data_prep.partition import PARTITIONS_DIR, DocFilter
from data_prep.sources import SourceStats
from mythos.data.format import FORMAT_VERSION, MANIFEST_NAME
from mythos.data.shard_writer import shards_intact, tokenizer_record

#: Hidden file recording the build key while a build is in progress (see :func:`check_out_dir`).
BUILD_MARKER = ".build.json"
#: Version of the per-partition manifest (``partitions/pNNNNN.json``) read by data_prep.merge.
PARTIAL_VERSION = 1
#: Shard files of any build (classic ``train-00000.tar`` and partitioned ``train-p00001-00000.tar``).
_SHARD_GLOB = "*-[0-9][0-9][0-9][0-9][0-9].tar"


def build_record(ctx: BuildContext, inputs: list[list[Any]], **extra: Any) -> dict[str, Any]:
    """The ``build`` record of a manifest, with its ``key``: parameters, tokenizer and the
    identity of every input (content, not paths: moving the corpus does not change the build)."""
    build = {"params": ctx.params.key_params(ctx.dtype), "tokenizer_sha256": ctx.tok.sha256, "inputs": inputs, **extra}
    build["key"] = sha256_bytes(canonical_json(build).encode())
    return build


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``, or None when missing, unreadable or not an object."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def describe_mismatch(old: dict[str, Any], new: dict[str, Any]) -> str:
    diffs = [k for k in ("params", "tokenizer_sha256", "inputs") if old.get(k) != new.get(k)]
    return ", ".join(diffs) or "build key"


def check_out_dir(out: Path, build: dict[str, Any], overwrite: bool) -> dict[str, Any] | None:
    """Refuse to mix builds in one directory. Returns the existing manifest of the *same* build,
    if any (the caller checks whether it is complete)."""
    found: dict[str, Any] | None = None
    for name in (MANIFEST_NAME, BUILD_MARKER):
        p = out / name
        if not p.is_file():
            continue
        try:
            doc = json.loads(p.read_text())
            old_build = doc["build"] if name == MANIFEST_NAME else doc
        except (ValueError, KeyError):
            old_build = {}
        if old_build.get("key") != build["key"]:
            if not overwrite:
                raise DataPrepError(
                    f"{out} holds shards of a different build ({describe_mismatch(old_build, build)} "
                    f"differ, per {name}); pass --overwrite to replace them or choose another --out"
                )
            clear(out)
            return None
        if name == MANIFEST_NAME:
            found = doc
    stray = sorted(p.name for p in out.glob(_SHARD_GLOB)) if out.is_dir() else []
    if stray and found is None and not (out / BUILD_MARKER).is_file():
        if not overwrite:
            raise DataPrepError(
                f"{out} holds shards ({stray[0]}, ...) without a manifest of this build; "
                f"pass --overwrite to replace them or choose another --out"
            )
        clear(out)
    return found


def clear(out: Path) -> None:
    """Remove every file a build writes (manifests, marker, shards and their temp files)."""
    partials = (out / PARTITIONS_DIR).glob("p*.json")
    for p in [out / MANIFEST_NAME, out / BUILD_MARKER, *out.glob(_SHARD_GLOB + "*"), *partials]:
        p.unlink(missing_ok=True)


def start_build(out: Path, build: dict[str, Any], overwrite: bool) -> dict[str, Any] | None:
    """The existing manifest when ``out`` already holds this complete build ("up to date");
    otherwise None, after claiming ``out`` for ``build`` (its marker written)."""
    existing = check_out_dir(out, build, overwrite)
    if existing is not None and shards_intact(out, existing["shards"]):
        print(f"{out}: up to date ({len(existing['shards'])} shards verified)", file=sys.stderr)
        return existing
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / BUILD_MARKER, build)
    return None


def finish_build(out: Path) -> None:
    """The final manifest is in place: the directory no longer holds a build in progress."""
    (out / BUILD_MARKER).unlink(missing_ok=True)


def manifest_header(ctx: BuildContext, build: dict[str, Any]) -> dict[str, Any]:
    """The manifest fields shared by a classic manifest, every partial manifest and the merge."""
    return {
        "format_version": FORMAT_VERSION,
        "seq_len": ctx.params.seq_len,
        "tokens_per_sample": ctx.params.seq_len + 1,
        "dtype": ctx.dtype,
        "sample_format": {
            "member": "<shard stem>/<index:08d>.tokens.npy",
            "packing": "documents joined as doc EOS doc EOS ...; no BOS; tail < seq_len+1 dropped",
            "val_split": "blake2b(key=seed, document utf-8 bytes) / 2**64 < val_fraction",
            "plain_text_document": ctx.params.plain_docs,
        },
        "tokenizer": tokenizer_record(ctx.tok),
        "build": build,
        "versions": {"sentencepiece": spm.__version__, "numpy": np.__version__},
    }


def split_summary(documents: int, text_bytes: int, stream_tokens: int, shards: list[dict], dropped: int) -> dict:
    """One ``splits.<split>`` entry of a manifest (also used by data_prep.merge to sum partitions)."""
    return {
        "documents": documents,
        "text_bytes": text_bytes,
        "stream_tokens": stream_tokens,
        "samples": sum(s["num_samples"] for s in shards),
        "tokens": sum(s["num_tokens"] for s in shards),
        "dropped_tail_tokens": dropped,
        # bytes per stored token (EOS included): converts loss/token into bits/byte
        "bytes_per_token": round(text_bytes / stream_tokens, 6) if stream_tokens else None,
    }


def content_records(
    ctx: BuildContext, inputs_desc: list[dict[str, Any]], packed: PackResult, doc_filter: DocFilter
) -> dict[str, Any]:
    """The manifest keys that describe what was read and written (inputs with their document
    counts, filters, per-split summaries, shards); shared by full and partial manifests. An
    input a partition did not read counts zero documents."""
    params = ctx.params
    empty = SourceStats()
    stats = packed.source_stats
    scope = "none" if params.dedup == "none" else "run" if params.num_partitions <= 1 else params.dedup
    return {
        "inputs": [
            {
                **d,
                "documents": stats.get(d["path"], empty).documents,
                "skipped_bad_utf8": stats.get(d["path"], empty).skipped_bad_utf8,
                "replaced_bad_utf8": stats.get(d["path"], empty).replaced_bad_utf8,
            }
            for d in inputs_desc
        ],
        "filters": {"min_chars": params.min_chars, "dedup": params.dedup, "dedup_scope": scope, **doc_filter.stats()},
        "splits": {
            split: split_summary(p.documents, p.text_bytes, p.stream_tokens, p.shards, packed.dropped[split])
            for split, p in packed.packers.items()
        },
        "shards": packed.shards,
    }
