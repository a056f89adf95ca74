"""Write *unpacked*, loss-masked examples (one example per sample) as mythos shards.

The packed-LM writer (:mod:`data_prep.shard`) concatenates documents; supervised tasks instead
need one example per sample and a loss only on the answer. This writer produces the same
on-disk format (tar members, manifest, data hash; see :mod:`mythos.data.format`) with
``"loss_mask": true``: each member is a ``[2, seq_len + 1]`` array, row 0 the tokens (the example,
right-padded with ``pad_id``) and row 1 the 0/1 target mask. The loader turns it into
``labels = IGNORE_INDEX`` wherever the mask is 0, so the training loss, the token counts and the
validation loss all cover answer tokens only.

Deterministic: the same rows give byte-identical shards (fixed tar headers, fixed order).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.common import DataPrepError, atomic_write_bytes, atomic_write_json, sha256_bytes
from data_prep.tarwriter import tar_bytes
from mythos.data.format import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    data_hash,
    dtype_for_vocab,
    encode_npy,
    member_name,
    shard_name,
)
from mythos.data.tokenizer import Tokenizer

Row = tuple[Sequence[int], Sequence[int]]  # (tokens, mask), same length


def pack_rows(rows: Sequence[Row], seq_len: int, pad_id: int, dtype: str) -> np.ndarray:
    """``[n, 2, seq_len + 1]`` array of right-padded (tokens, mask) rows."""
    out = np.zeros((len(rows), 2, seq_len + 1), dtype=dtype)
    out[:, 0] = pad_id
    for i, (tokens, mask) in enumerate(rows):
        if len(tokens) != len(mask):
            raise DataPrepError(f"example {i}: {len(tokens)} tokens but {len(mask)} mask entries")
        if len(tokens) > seq_len + 1:
            raise DataPrepError(f"example {i} has {len(tokens)} tokens, more than seq_len+1={seq_len + 1}")
        if not any(mask):
            raise DataPrepError(f"example {i} has no target token (mask is all 0)")
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
) -> dict[str, Any]:
    """Write ``{split: rows}`` (``train`` required, ``val`` optional) to ``out_dir``; returns the
    manifest. ``seq_len`` defaults to the longest row minus one. ``extra`` is stored in the
    manifest under ``"task"`` (provenance, not part of the data hash)."""
    tok = Tokenizer(tokenizer)
    if not splits.get("train"):
        raise DataPrepError("no training examples to write")
    longest = max(len(t) for rows in splits.values() for t, _ in rows)
    seq_len = seq_len or longest - 1
    dtype = dtype_for_vocab(tok.vocab_size)
    out = Path(out_dir)
    shards: list[dict[str, Any]] = []
    stats: dict[str, Any] = {}
    for split in ("train", "val"):
        rows = splits.get(split, [])
        arr = pack_rows(rows, seq_len, tok.pad_id, dtype)
        for s, lo in enumerate(range(0, len(arr), samples_per_shard)):
            chunk = arr[lo : lo + samples_per_shard]
            name = shard_name(split, s)
            data = tar_bytes((member_name(name, i), encode_npy(row)) for i, row in enumerate(chunk))
            atomic_write_bytes(out / name, data)
            shards.append({"name": name, "split": split, "num_samples": len(chunk), "num_tokens": int(chunk[:, 0].size),
                           "sha256": sha256_bytes(data), "bytes": len(data)})
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
        "tokenizer": {"path": tok.path.as_posix(), "sha256": tok.sha256, "vocab_size": tok.vocab_size,
                      "bos_id": tok.bos_id, "eos_id": tok.eos_id, "pad_id": tok.pad_id, "unk_id": tok.unk_id},
        "splits": stats,
        "shards": shards,
        "task": dict(extra or {}),
    }
    manifest["data_hash"] = data_hash(manifest)
    atomic_write_json(out / MANIFEST_NAME, manifest)
    return manifest
