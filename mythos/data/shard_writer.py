"""Writing shards in the on-disk format of :mod:`mythos.data.format` (the reader's counterpart).

The one owner of a shard's bytes, its manifest entry and the manifest's final write, for both
writers: ``data_prep`` (packed LM samples, ``python -m data_prep.shard``) and the task builders
(:mod:`mythos.tasks`, loss-masked examples via :func:`write_example_shards`).

Deterministic: the same samples give byte-identical shards, so a shard's sha256 is a content
hash. Every tar header field that could vary between runs or machines is fixed (mtime 0, uid/gid
0, owner ``mythos``, mode 0644, ustar format, members in order). Shards are uncompressed because
random access (``wids``, our offset index) needs member data at fixed byte offsets.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mythos.data.format import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    SPLITS,
    data_hash,
    dtype_for_vocab,
    encode_npy,
    member_name,
    shard_name,
)
from mythos.data.tokenizer import Tokenizer
from mythos.io import atomic_write_bytes, atomic_write_json, sha256_bytes, sha256_file

TAR_OWNER = "mythos"

Row = tuple[Sequence[int], Sequence[int]]
"""One loss-masked example: (tokens, 0/1 target mask), same length."""


def tar_bytes(members: Iterable[tuple[str, bytes]]) -> bytes:
    """The bytes of a tar archive holding ``(name, data)`` members in the given order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = TAR_OWNER
            info.type = tarfile.REGTYPE
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def shard_is_intact(path: Path, size: int, sha256: str) -> bool:
    """``path`` exists with exactly this size and content hash (size first: it is free)."""
    return path.is_file() and path.stat().st_size == size and sha256_file(path) == sha256


def shards_intact(out_dir: Path, shards: Sequence[Mapping[str, Any]]) -> bool:
    """Every shard a manifest lists is in ``out_dir`` with its recorded size and sha256."""
    return all(shard_is_intact(out_dir / s["name"], s["bytes"], s["sha256"]) for s in shards)


def write_shard(out_dir: Path, name: str, split: str, samples: np.ndarray) -> tuple[dict[str, Any], bool]:
    """Write ``samples`` (``[n, L]`` token rows, or ``[n, 2, L]`` token + mask rows) as shard
    ``name``; returns its manifest entry and whether the file was written. A file that already
    holds exactly these bytes is kept (resume after an interruption, or an identical re-run)."""
    data = tar_bytes((member_name(name, i), encode_npy(row)) for i, row in enumerate(samples))
    sha = sha256_bytes(data)
    final = out_dir / name
    written = not shard_is_intact(final, len(data), sha)
    if written:
        atomic_write_bytes(final, data)
    entry = {
        "name": name,
        "split": split,
        "num_samples": int(samples.shape[0]),
        "num_tokens": int(samples.shape[0] * samples.shape[-1]),  # token rows only, not the mask
        "sha256": sha,
        "bytes": len(data),
    }
    return entry, written


def tokenizer_record(tok: Tokenizer) -> dict[str, Any]:
    """The manifest's ``tokenizer`` entry (its ids and sha256 enter the data hash)."""
    return {
        "path": tok.path.as_posix(),
        "sha256": tok.sha256,
        "vocab_size": tok.vocab_size,
        "bos_id": tok.bos_id,
        "eos_id": tok.eos_id,
        "pad_id": tok.pad_id,
        "unk_id": tok.unk_id,
    }


def write_manifest(out_dir: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Add ``data_hash`` and write ``manifest.json`` atomically: last, so its presence means
    every shard it lists is complete. Returns ``manifest``."""
    manifest["data_hash"] = data_hash(manifest)
    atomic_write_json(out_dir / MANIFEST_NAME, manifest)
    return manifest


# --------------------------------------------------------------------------------------------
# Unpacked, loss-masked examples (supervised tasks)
# --------------------------------------------------------------------------------------------


def pack_rows(rows: Sequence[Row], seq_len: int, pad_id: int, dtype: str) -> np.ndarray:
    """``[n, 2, seq_len + 1]`` array of right-padded (tokens, mask) rows."""
    out = np.zeros((len(rows), 2, seq_len + 1), dtype=dtype)
    out[:, 0] = pad_id
    for i, (tokens, mask) in enumerate(rows):
        if len(tokens) != len(mask):
            raise ValueError(f"example {i}: {len(tokens)} tokens but {len(mask)} mask entries")
        if len(tokens) > seq_len + 1:
            raise ValueError(f"example {i} has {len(tokens)} tokens, more than seq_len+1={seq_len + 1}")
        if not any(mask):
            raise ValueError(f"example {i} has no target token (mask is all 0)")
        out[i, 0, : len(tokens)] = tokens
        out[i, 1, : len(mask)] = mask
    return out


def write_example_shards(
    out_dir: str | Path,
    tokenizer: str | Path,
    splits: Mapping[str, Sequence[Row]],
    *,
    seq_len: int | None = None,
    samples_per_shard: int = 1 << 16,
    extra: Mapping[str, Any] | None = None,
    hops: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, Any]:
    """Write ``{split: rows}`` (``train`` required, ``val`` optional) to ``out_dir`` with one
    example per sample and ``"loss_mask": true`` (see :mod:`mythos.data.format`); returns the
    manifest. ``seq_len`` defaults to the longest row minus one. ``extra`` is stored under
    ``"task"`` (provenance, not part of the data hash). ``hops`` (``{split: [hop count per row]}``)
    is stored as ``sample_hops`` and *is* part of the data hash (the ``hops`` loop schedule trains
    on it). Raises ``ValueError`` on a bad row."""
    tok = Tokenizer(tokenizer)
    if not splits.get("train"):
        raise ValueError("no training examples to write")
    longest = max(len(t) for rows in splits.values() for t, _ in rows)
    seq_len = seq_len or longest - 1
    dtype = dtype_for_vocab(tok.vocab_size)
    out = Path(out_dir)
    shards: list[dict[str, Any]] = []
    stats: dict[str, Any] = {}
    for split in SPLITS:
        arr = pack_rows(splits.get(split, []), seq_len, tok.pad_id, dtype)
        for s, lo in enumerate(range(0, len(arr), samples_per_shard)):
            shards.append(write_shard(out, shard_name(split, s), split, arr[lo : lo + samples_per_shard])[0])
        stats[split] = {"samples": len(arr), "tokens": int(arr[:, 0].size), "target_tokens": int(arr[:, 1].sum())}
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "seq_len": seq_len,
        "tokens_per_sample": seq_len + 1,
        "dtype": dtype,
        "loss_mask": True,
        "sample_format": {
            "member": "<shard stem>/<index:08d>.tokens.npy",
            "layout": "[2, seq_len+1]: row 0 tokens (one example, right-padded with pad_id), row 1 target mask",
            "packing": "none: one example per sample",
        },
        "tokenizer": tokenizer_record(tok),
        "splits": stats,
        "shards": shards,
        "task": dict(extra or {}),
    }
    if hops is not None:
        for split in SPLITS:
            if len(hops.get(split, [])) != len(splits.get(split, [])):
                raise ValueError(f"hops[{split!r}] has {len(hops.get(split, []))} entries for "
                                 f"{len(splits.get(split, []))} rows")
        manifest["sample_hops"] = {split: [int(h) for h in hops.get(split, [])] for split in SPLITS}
    return write_manifest(out, manifest)
