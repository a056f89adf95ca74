"""Checkpoints: DeepSpeed engine state + everything else exact resume needs, saved atomically.

Layout under ``RUN_DIR/checkpoints/``::

    step0000200/                 DeepSpeed tag dir (model, optimizer, ZeRO shards, client state)
        rng_rank{r}.pt           each rank's python/numpy/torch(/cuda) RNG state
        COMPLETE                 written by rank 0 after a barrier that follows every rank's save;
                                 JSON with the step and the world size that wrote it
        universal/               only after a resume on another world size: the universal
                                 conversion of this tag (mythos.train.reshard)
    latest                       DeepSpeed's pointer (NOT trusted: see below)

DeepSpeed's rank 0 writes ``latest`` after its own files but *before* the other ranks finish, so
``latest`` does not prove a checkpoint is whole. A checkpoint counts only when its ``COMPLETE``
marker exists; ``resume: auto`` picks the newest such tag, and a crash at any point of a save
leaves the previous complete checkpoint untouched and selectable.

The client state (in DeepSpeed's model-states file) carries the step, the data loader position,
token/FLOP counters and the data fingerprint; the loop counts of the RDT are a function of
(seed, step), so the step restores them too.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mythos import dist
from mythos.io import atomic_torch_save, atomic_write_text

TAG_RE = re.compile(r"^step(\d{7,})$")
COMPLETE = "COMPLETE"
UNIVERSAL = "universal"  # TAG/universal: the tag converted for another world size (see reshard)


def tag_for(step: int) -> str:
    return f"step{step:07d}"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def is_complete(tag_dir: Path) -> bool:
    return (tag_dir / COMPLETE).is_file()


def list_tags(ckpt_root: Path, complete_only: bool = True) -> list[tuple[int, Path]]:
    """``(step, dir)`` of checkpoints under ``ckpt_root``, oldest first."""
    if not ckpt_root.is_dir():
        return []
    out = []
    for d in ckpt_root.iterdir():
        m = TAG_RE.match(d.name)
        if m and d.is_dir() and (is_complete(d) or not complete_only):
            out.append((int(m.group(1)), d))
    return sorted(out)


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
    engine.save_checkpoint(str(ckpt_root), tag=tag, client_state=client_state, save_latest=True)
    rank = dist.env_info().rank
    atomic_torch_save(rng_state(), tag_dir / f"rng_rank{rank}.pt")
    dist.barrier()  # every rank's files are on disk
    if dist.env_info().is_main:
        info = {"step": step, "world_size": dist.env_info().world_size, "time": time.time()}
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
    load_path, client = engine.load_checkpoint(str(load_dir), tag=tag)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {load_dir / tag}")
    if universal:
        _repair_universal_zero3_load(engine, hparams)
    rng_file = tag_dir / f"rng_rank{dist.env_info().rank}.pt"
    if restore_rng and rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
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
