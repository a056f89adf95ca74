"""Checkpoints: DeepSpeed engine state + everything else exact resume needs, saved atomically.

Layout under ``RUN_DIR/checkpoints/``::

    step0000200/                 DeepSpeed tag dir (model, optimizer, ZeRO shards, client state)
        rng_rank{r}.pt           each rank's python/numpy/torch(/cuda) RNG state, as tensors + ints
        COMPLETE                 written by rank 0 after a barrier that follows every rank's save;
                                 JSON with the step, the world size that wrote it, and the size
                                 and sha256 of every file of the tag (see "Verification")
    step0000300.corrupt-<time>/  a checkpoint that failed verification at resume, moved aside
                                 (never deleted or pruned: inspect it, then delete it yourself)
        universal/               only after a resume on another world size: the universal
                                 conversion of this tag (mythos.train.reshard)
    latest                       DeepSpeed's pointer (NOT trusted: see below)

DeepSpeed's rank 0 writes ``latest`` after its own files but *before* the other ranks finish, so
``latest`` does not prove a checkpoint is whole. A checkpoint counts only when its ``COMPLETE``
marker exists; ``resume: auto`` picks the newest such tag, and a crash at any point of a save
leaves the previous complete checkpoint untouched and selectable.

**Verification.** A ``COMPLETE`` marker proves every rank *finished* writing, not that the bytes
are still intact (a truncated copy, a node that lost unflushed pages, a bad disk). So the marker
records each file's size and sha256 -- every rank hashes the files it wrote, right after writing
them (page cache, in parallel), and rank 0 merges the lists -- and :func:`verify` re-checks them
before a resume trusts the tag (:func:`mythos.train.reshard.plan_resume`, on every rank, before the
process group: a deterministic function of the files, so every rank picks the same tag). Cost:
sha256 runs at ~1 GB/s per core (measured 0.9 GB/s here, more on an idle SHA-NI core; up to 4
threads per rank); a 1B-parameter AdamW checkpoint (~16 GB with fp32 master weights and moments)
adds ~4-16 s per save, split across ranks, and ~4-16 s per resume on every rank (each rank reads
the whole tag; ranks of one node share the page cache). ``verify="size"`` checks sizes only (a
``stat`` per file). Markers written before verification existed record no files and are trusted as
before.

**Trust.** What *we* write (``rng_rank{r}.pt``, ``COMPLETE``) holds only tensors, ints, floats and
strings and is loaded with ``torch.load(weights_only=True)``: a pickled callable is refused, never
run. DeepSpeed's own engine files (model states, optimizer shards) are pickles that DeepSpeed
loads with full unpickling: load only checkpoints you trust.

The client state (in DeepSpeed's model-states file) carries the step, the data loader position,
token/FLOP counters and the data fingerprint; the loop counts of the RDT are a function of
(seed, step), so the step restores them too.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mythos import dist
from mythos.config import ConfigError
from mythos.io import atomic_torch_save, atomic_write_text
from mythos.run_dir import (
    COMPLETE,
    is_complete,
    list_tags,
    read_marker,
    tag_for,
)

UNIVERSAL = "universal"  # TAG/universal: the tag converted for another world size (see reshard)
CORRUPT = ".corrupt-"  # a tag that failed verification is renamed TAG.corrupt-<time> (no TAG_RE match)
RNG_FORMAT = 1  # version of the tensor-only rng_rank{r}.pt layout
#: Files of a tag written by one rank: ZeRO shards / model states of ZeRO-3 and our RNG file.
_OWNER_RE = re.compile(r"(?:zero_pp_rank_|rng_rank)(\d+)[_.]")
_HASH_CHUNK = 8 << 20



def rng_state() -> dict[str, Any]:
    """This process's python/numpy/torch(/cuda) RNG state as tensors, ints, floats and strings only
    (no pickled objects), so :func:`load_rng` can read it with ``weights_only=True``."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "format": RNG_FORMAT,
        "python_version": int(version),
        "python_state": torch.tensor(mt, dtype=torch.int64),  # 625 words < 2**32
        "python_gauss": gauss,  # float or None: both load with weights_only
        "numpy_kind": str(kind),
        "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "numpy_pos": int(pos),
        "numpy_has_gauss": int(has_gauss),
        "numpy_gauss": float(cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state` (bit-exact: every value round-trips without rounding)."""
    random.setstate((state["python_version"], tuple(int(x) for x in state["python_state"].tolist()),
                     state["python_gauss"]))
    np.random.set_state((state["numpy_kind"], state["numpy_keys"].numpy().astype(np.uint32),
                         state["numpy_pos"], state["numpy_has_gauss"], state["numpy_gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def load_rng(path: Path) -> dict[str, Any]:
    """Read ``rng_rank{r}.pt`` with ``weights_only=True``: anything but tensors and plain values
    (a pickled callable, an old pickle of numpy objects) is refused with a one-line
    :class:`ConfigError` before any of it runs."""
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        raise ConfigError(
            f"refusing to load {path}: not a tensor-only RNG file ({first[:160]}); it may be tampered with or "
            f"written by an older mythos -- if you trust the checkpoint, delete its rng_rank*.pt files "
            f"(training draws nothing from the global RNG; only the per-rank stream is restarted)"
        ) from None
    if not isinstance(state, dict) or state.get("format") != RNG_FORMAT:
        raise ConfigError(f"refusing to load {path}: unknown RNG file format (expected format {RNG_FORMAT})")
    return state




def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)  # releases the GIL: the thread pool really hashes in parallel
    return h.hexdigest()


def _tag_files(tag_dir: Path) -> list[str]:
    """Relative paths of the files that make up a tag, as written by the save: everything but
    ``COMPLETE``, temp files (``.*``) and the ``universal/`` conversion added later."""
    out = []
    for f in tag_dir.rglob("*"):
        rel = f.relative_to(tag_dir)
        if f.is_file() and rel.parts[0] not in (COMPLETE, UNIVERSAL) and not any(p.startswith(".") for p in rel.parts):
            out.append(rel.as_posix())
    return sorted(out)


def _owner(rel: str, world_size: int) -> int:
    """The rank that hashes ``rel`` at save: the one that wrote it where the name says so (its
    pages are still in that node's cache), else rank 0 (model states, DeepSpeed's extras)."""
    m = _OWNER_RE.search(Path(rel).name)
    r = int(m.group(1)) if m else 0
    return r if r < world_size else 0


def describe_files(tag_dir: Path, names: list[str], checksum: bool = True) -> dict[str, dict[str, Any]]:
    """``{rel: {"size": n, "sha256": hex}}`` of ``names`` in ``tag_dir`` (up to 4 hashing threads)."""
    def one(rel: str) -> tuple[str, dict[str, Any]]:
        p = tag_dir / rel
        rec: dict[str, Any] = {"size": p.stat().st_size}
        if checksum:
            rec["sha256"] = _sha256(p)
        return rel, rec

    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1, len(names)))) as pool:
        return dict(pool.map(one, names))


def _gather_file_records(tag_dir: Path) -> dict[str, dict[str, Any]]:
    """After every rank's files are on disk: each rank describes the files it owns; rank 0 gets
    the union (an object all-gather; a plain dict without a process group)."""
    info = dist.env_info()
    world = info.world_size if dist.initialized() else 1
    mine = describe_files(tag_dir, [f for f in _tag_files(tag_dir) if _owner(f, world) == info.rank % world])
    if world == 1:
        return mine
    import torch.distributed as tdist

    parts: list[Any] = [None] * world
    tdist.all_gather_object(parts, mine)
    return {k: v for part in parts for k, v in part.items()}


def check_identity(recorded: dict[str, Any], path: Path, *, model_hash: str, data_fingerprint: str | None,
                   require: bool = True) -> None:
    """Refuse to resume ``path`` with another model or data order: ``recorded`` is the checkpoint's
    client state (the launch, after loading) or its ``COMPLETE`` marker (the dry run, and the
    launch before any process group: the same keys, readable without unpickling).
    ``data_fingerprint=None`` checks the model only; ``require=False`` skips a key ``recorded``
    lacks (markers of older checkpoints)."""
    for key, now in (("model_hash", model_hash), ("data_fingerprint", data_fingerprint)):
        if now is not None and (require or key in recorded) and recorded.get(key) != now:
            raise ConfigError(
                f"checkpoint {path} was written with a different {key.replace('_', ' ')} "
                f"({recorded.get(key)} vs {now}); resume with the original config, or use a new run_dir"
            )



def verify(tag_dir: Path, checksum: bool = True) -> str | None:
    """None if every file the ``COMPLETE`` marker records is present with its recorded size (and,
    with ``checksum``, sha256); else the first problem, as a short phrase naming the file. A marker
    that records no files (written before verification existed) passes unchecked."""
    marker = read_marker(tag_dir)
    if marker is None:
        return f"its {COMPLETE} marker is unreadable"
    files = marker.get("files")
    if not isinstance(files, dict):
        return None
    for rel, rec in sorted(files.items()):  # sizes first: a stat each, catches truncation at once
        try:
            size = (tag_dir / rel).stat().st_size
        except OSError:
            return f"file {rel}: missing"
        if size != rec.get("size"):
            return f"file {rel}: size {size} != recorded {rec.get('size')}"
    if not checksum:
        return None
    try:
        now = describe_files(tag_dir, sorted(files))
    except OSError as exc:
        return f"cannot read it ({type(exc).__name__}: {exc})"
    for rel, rec in sorted(files.items()):
        if rec.get("sha256") and now[rel]["sha256"] != rec["sha256"]:
            return f"file {rel}: sha256 {now[rel]['sha256'][:12]}... != recorded {rec['sha256'][:12]}..."
    return None


def quarantine(tag_dir: Path) -> Path:
    """Move a tag that failed verification aside as ``TAG.corrupt-<time>``: it no longer counts as
    a checkpoint (retention never sees or deletes it; a later save of the same step gets a fresh
    directory), and it is kept for inspection."""
    dest = tag_dir.with_name(f"{tag_dir.name}{CORRUPT}{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while dest.exists():
        dest = dest.with_name(f"{tag_dir.name}{CORRUPT}{time.strftime('%Y%m%d-%H%M%S')}-{n}")
        n += 1
    os.replace(tag_dir, dest)
    return dest


def find_resume(ckpt_root: Path, resume: str) -> Path | None:
    """The checkpoint dir to resume from: ``auto`` -> newest complete (or None), ``none`` ->
    None, else a path that must be a complete checkpoint."""
    if resume == "none":
        return None
    if resume == "auto":
        tags = list_tags(ckpt_root)
        return tags[-1][1] if tags else None
    path = Path(resume)
    if not path.is_dir() or not is_complete(path):
        raise FileNotFoundError(
            f"train.resume={resume}: not a complete checkpoint directory (no {COMPLETE} marker)"
        )
    return path


class StorageFullError(ConfigError):
    """The checkpoint filesystem is full (or over quota): an environment problem the operator fixes,
    reported as one line (a :class:`ConfigError`, like bad data), never as a serializer traceback."""


#: Free bytes under which a failed save is blamed on the disk. torch's writer reports a full disk
#: as "enforce fail at inline_container.cc" / "basic_ios::clear", without the errno.
FULL_BELOW_BYTES = 64 << 20


def out_of_space(exc: BaseException, where: Path) -> bool:
    """Whether ``exc`` (raised while writing under ``where``) is a full disk or an exceeded quota:
    ENOSPC/EDQUOT anywhere in its chain, or less than :data:`FULL_BELOW_BYTES` (or 2% of a small
    filesystem) left on ``where``."""
    seen: BaseException | None = exc
    for _ in range(32):  # a chain, bounded (causes can form a cycle)
        if seen is None:
            break
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(seen) or "Disk quota exceeded" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        usage = shutil.disk_usage(where)
    except OSError:
        return False
    return usage.free < min(FULL_BELOW_BYTES, usage.total // 50)  # 2%: small disks (and tests) too


def save(engine: Any, ckpt_root: Path, step: int, client_state: dict[str, Any], keep_last: int) -> Path:
    """Save on ALL ranks (DeepSpeed requires it), then mark complete, then prune. Returns the tag dir."""
    tag = tag_for(step)
    tag_dir = ckpt_root / tag
    if is_complete(tag_dir):
        # e.g. a stop signal right after resuming from this step: the state is the saved one,
        # and rewriting a complete checkpoint in place would put it at risk for nothing
        return tag_dir
    if dist.env_info().is_main and tag_dir.exists() and not is_complete(tag_dir):
        shutil.rmtree(tag_dir)  # leftovers of a crashed save of this very step
    dist.barrier()
    rank = dist.env_info().rank
    try:
        engine.save_checkpoint(str(ckpt_root), tag=tag, client_state=client_state, save_latest=True)
        atomic_torch_save(rng_state(), tag_dir / f"rng_rank{rank}.pt")
    except Exception as exc:
        if not out_of_space(exc, ckpt_root):
            raise
        # a partial tag is never a checkpoint (no COMPLETE), but on a full disk its bytes matter now
        shutil.rmtree(tag_dir, ignore_errors=True)
        kept = ", ".join(d.name for _, d in list_tags(ckpt_root)) or "none"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise StorageFullError(
            f"no space left on {ckpt_root} while saving {tag} ({first}); removed the partial {tag}, kept the "
            f"complete checkpoints ({kept}); free space (or lower train.keep_last) and start again: "
            f"train.resume=auto continues from the newest"
        ) from exc
    dist.barrier()  # every rank's files are on disk
    files = _gather_file_records(tag_dir)  # a collective: every rank hashes what it wrote
    if dist.env_info().is_main:
        info = {"step": step, "world_size": dist.env_info().world_size, "time": time.time(), "files": files}
        # the identity the resume checks (trainer): readable without unpickling DeepSpeed's files
        info.update({k: client_state[k] for k in ("model_hash", "data_fingerprint") if k in client_state})
        atomic_write_text(tag_dir / COMPLETE, json.dumps(info) + "\n")
        prune(ckpt_root, keep_last)
    dist.barrier()
    return tag_dir


def prune(ckpt_root: Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` complete checkpoints; drop older ones and incomplete ones
    older than the newest complete one (never the newest complete)."""
    complete = list_tags(ckpt_root)
    if not complete:
        return
    newest = complete[-1][0]
    doomed = [d for _, d in complete[: max(len(complete) - max(keep_last, 1), 0)]]
    doomed += [d for s, d in list_tags(ckpt_root, complete_only=False) if s < newest and not is_complete(d)]
    for d in doomed:
        # rename first so a crash mid-delete never leaves a half-deleted dir that looks like a tag
        trash = d.with_name(f".deleting-{d.name}")
        os.replace(d, trash)
        shutil.rmtree(trash, ignore_errors=True)


def load(engine: Any, tag_dir: Path, *, universal: bool = False, restore_rng: bool = True) -> dict[str, Any]:
    """Load engine state and this rank's RNG; returns the client state.

    ``universal``: load ``tag_dir/universal`` (the conversion :mod:`mythos.train.reshard` made for
    another world size; the engine must run with ``checkpoint.load_universal``). ``restore_rng``:
    restore ``rng_rank{r}.pt`` -- only meaningful on the world size that wrote the files."""
    load_dir, tag = (tag_dir, UNIVERSAL) if universal else (tag_dir.parent, tag_dir.name)
    groups = engine.optimizer.param_groups if universal else []
    hparams = [{k: v for k, v in g.items() if k not in ("params", "step")} for g in groups]
    rng_file = tag_dir / f"rng_rank{dist.env_info().rank}.pt"
    # our own file first: a tampered one is refused before DeepSpeed loads anything
    rng = load_rng(rng_file) if restore_rng and rng_file.is_file() else None
    try:
        load_path, client = engine.load_checkpoint(str(load_dir), tag=tag)
    except RuntimeError as exc:
        if "size mismatch" not in str(exc) and "Missing key" not in str(exc) and "Unexpected key" not in str(exc):
            raise
        # the model-states file holds another architecture: one line, like the model-hash check
        detail = next((ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln or "key" in ln), "")
        raise ConfigError(
            f"checkpoint {tag_dir} was written for a different model ({detail[:200]}); resume with the original "
            f"model config, or use a new run_dir"
        ) from None
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {load_dir / tag}")
    if universal:
        _repair_universal_zero3_load(engine, hparams)
    if rng is not None:
        set_rng_state(rng)
    return client or {}


def _repair_universal_zero3_load(engine: Any, hparams: list[dict[str, Any]]) -> None:
    """Undo two slips of DeepSpeed 0.19's ZeRO-3 universal load
    (``stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3``), found because the continued
    losses drifted from the uninterrupted run by 1e-3 from the first update on:

    - it copies param group 0's hyperparameters into *every* group (the no-decay group gets weight
      decay): put back this run's own, which come from its config ("step", which FusedAdam keeps
      per group, is checkpoint state and stays as loaded);
    - it stores ONE ``step`` tensor in the state of every sub-group; torch's AdamW increments it in
      place, so it would advance once per sub-group and step and skew the bias correction of all
      but the first: give each its own copy.

    Both are no-ops where DeepSpeed got it right (ZeRO-1/2)."""
    for group, saved in zip(engine.optimizer.param_groups, hparams):
        group.update(saved)
    inner = getattr(engine.optimizer, "optimizer", None)
    for state in getattr(inner, "state", {}).values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
