"""The on-disk contract between the writer (:mod:`mythos.data.shard_writer`, used by
``data_prep.shard`` and :mod:`mythos.tasks`) and the reader (:mod:`mythos.data`).

A shard directory holds::

    manifest.json            written last, atomically; lists every shard with its sha256
    train-00000.tar ...      uncompressed POSIX tar (webdataset/wids-readable)
    val-00000.tar ...

Each tar member is one packed sample ``"<shard stem>/<i:08d>.tokens.npy"`` (webdataset key
``"<shard stem>/<i:08d>"``, extension ``tokens.npy``): a 1-D ``.npy`` array of ``seq_len + 1``
token ids, ``uint16`` when the vocabulary fits (<= 65536) else ``uint32``. The extra token makes
``input_ids = x[:-1]`` and ``labels = x[1:]`` without crossing samples.

**Loss-masked samples** (supervised tasks, e.g. :mod:`mythos.tasks`; manifest ``"loss_mask":
true``): each member is a 2-D ``[2, seq_len + 1]`` array, row 0 the token ids and row 1 a 0/1
mask; token ``x[j]`` is a training target iff ``mask[j] == 1`` (the loader turns the others into
``IGNORE_INDEX`` labels). Packed LM shards never carry the key, so their hash is unchanged.

This module has no torch import: the writer (and through it ``data_prep``) uses it too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from mythos.config import REPO_ROOT, ConfigError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
TOKENS_EXT = "tokens.npy"
SPLITS = ("train", "val")


class DataFormatError(ConfigError):
    """A shard directory that does not match its manifest (missing, truncated, corrupt, wrong
    version). The message is one line naming the shard/file and what to do. A subclass of
    :class:`~mythos.config.ConfigError` so entry points report both the same way."""


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.tar"


def member_name(shard: str, index: int) -> str:
    """Tar member name of sample ``index`` of ``shard`` (``"train-00003.tar"``)."""
    return f"{shard.removesuffix('.tar')}/{index:08d}.{TOKENS_EXT}"


def dtype_for_vocab(vocab_size: int) -> str:
    """Smallest unsigned dtype holding every id in ``[0, vocab_size)``."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def dtype_max_vocab(dtype: str) -> int:
    return {"uint16": 1 << 16, "uint32": 1 << 32}[dtype]


def encode_npy(tokens: np.ndarray) -> bytes:
    """``.npy`` bytes of a 1-D array (deterministic: numpy's header depends only on dtype/shape)."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(tokens), allow_pickle=False)
    return buf.getvalue()


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    name: str
    split: str
    num_samples: int
    num_tokens: int
    sha256: str
    bytes: int


@dataclasses.dataclass(frozen=True)
class Manifest:
    """A parsed, validated ``manifest.json`` (``raw`` keeps the full dict, provenance included)."""

    directory: Path
    format_version: int
    seq_len: int
    dtype: str
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int
    tokenizer_sha256: str
    shards: tuple[ShardInfo, ...]
    raw: dict[str, Any]
    loss_mask: bool = False
    """Samples carry a target mask row (see the module docstring)."""

    @property
    def tokens_per_sample(self) -> int:
        """Tokens stored per sample: ``seq_len + 1``."""
        return self.seq_len + 1

    @property
    def sample_rows(self) -> int:
        """Rows per stored sample: 1 (tokens) or 2 (tokens + loss mask)."""
        return 2 if self.loss_mask else 1

    def split_shards(self, split: str) -> tuple[ShardInfo, ...]:
        return tuple(s for s in self.shards if s.split == split)

    def num_samples(self, split: str) -> int:
        return sum(s.num_samples for s in self.split_shards(split))

    def sample_hops(self, split: str) -> np.ndarray | None:
        """``int64 [num_samples(split)]``: each sample's hop count (reasoning depth) in split
        order, for the ``hops`` loop schedule; None when the shards do not record it (LM data).
        Written by :mod:`mythos.tasks`; part of the data hash."""
        hops = self.raw.get("sample_hops")
        if hops is None:
            return None
        return np.asarray(hops.get(split, []), dtype=np.int64)

    @property
    def data_hash(self) -> str:
        """Identity of the *data*: sha256 over the content-defining fields (format, seq_len,
        dtype, tokenizer, special ids, every shard's name/split/count/sha256). Input paths and
        tool versions are provenance and excluded, so the same data built on another machine or
        from another directory has the same hash."""
        return data_hash(self.raw)


def data_hash(raw: dict[str, Any]) -> str:
    ident = {
        "format_version": raw["format_version"],
        "seq_len": raw["seq_len"],
        "dtype": raw["dtype"],
        "vocab_size": raw["tokenizer"]["vocab_size"],
        "special_ids": {k: raw["tokenizer"][k] for k in ("bos_id", "eos_id", "pad_id")},
        "tokenizer_sha256": raw["tokenizer"]["sha256"],
        "shards": [[s["name"], s["split"], s["num_samples"], s["num_tokens"], s["sha256"]] for s in raw["shards"]],
    }
    if raw.get("loss_mask"):  # only masked (task) data has the key: LM data hashes are unchanged
        ident["loss_mask"] = True
    if raw.get("sample_hops") is not None:  # the hops loop schedule trains on them: they are data
        ident["sample_hops"] = raw["sample_hops"]
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def load_manifest(directory: str | Path) -> Manifest:
    """Read and validate ``<directory>/manifest.json`` (a file path to it works too)."""
    directory = Path(directory)
    if not directory.is_absolute() and not directory.exists() and (REPO_ROOT / directory).exists():
        directory = REPO_ROOT / directory  # configs name repo-relative paths (data/demo/shards)
    path = directory if directory.name == MANIFEST_NAME else directory / MANIFEST_NAME
    if not path.is_file():
        raise DataFormatError(
            f"no {MANIFEST_NAME} in {path.parent} (build shards with `python -m data_prep.shard` or fix data.shards)"
        )
    try:
        raw = json.loads(path.read_text())
        if raw.get("format_version") != FORMAT_VERSION:
            raise DataFormatError(
                f"{path}: format_version {raw.get('format_version')!r}, this code reads {FORMAT_VERSION} "
                f"(re-run data_prep.shard with this version)"
            )
        tok = raw["tokenizer"]
        shards = tuple(
            ShardInfo(
                s["name"],
                s["split"],
                int(s["num_samples"]),
                int(s["num_tokens"]),
                s["sha256"],
                int(s["bytes"]),
            )
            for s in raw["shards"]
        )
        for split, hops in (raw.get("sample_hops") or {}).items():
            n = sum(s.num_samples for s in shards if s.split == split)
            if len(hops) != n or (hops and min(hops) < 0):
                raise DataFormatError(f"{path}: sample_hops[{split!r}] has {len(hops)} entries for {n} samples "
                                      f"(or a negative count); rebuild the task with python -m mythos.tasks")
        return Manifest(
            directory=path.parent,
            format_version=raw["format_version"],
            seq_len=int(raw["seq_len"]),
            dtype=raw["dtype"],
            vocab_size=int(tok["vocab_size"]),
            bos_id=int(tok["bos_id"]),
            eos_id=int(tok["eos_id"]),
            pad_id=int(tok["pad_id"]),
            tokenizer_sha256=tok["sha256"],
            shards=shards,
            raw=raw,
            loss_mask=bool(raw.get("loss_mask", False)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, DataFormatError):
            raise
        raise DataFormatError(f"{path}: malformed manifest ({type(exc).__name__}: {exc}); rebuild it") from None
