"""Run provenance: what ran, where, on which code and data -- written by rank 0 at start-up.

``RUN_DIR/config.resolved.yaml`` (the exact config), ``ds_config.json`` (the derived DeepSpeed
config) and ``run_info.json`` (versions, git commit, world size, data hash and fingerprint, model
hash, parameter count, FLOPs per token, ...). ``launch/compare.py`` reads ``run_info.json`` to
decide whether two runs are comparable; ``section_hash`` of the model section is also stored in
every checkpoint, so resuming with a different model is refused.

A run that is resumed (a requeued SLURM job, a restart after a crash) runs in *segments*.
``run_info.json``'s top-level facts describe the latest segment, except ``start_time``, which is
the run's first start; ``segments`` lists every segment's own facts (start/end time and step,
world size, ZeRO stage, commit, host, resumed_from), so wall time, tokens/s and device-hours can
span all of them without counting the time a job sat in the queue (:mod:`mythos.tools.compare`). A
segment's ``end_time`` is written at each checkpoint and when training ends; a segment killed
without warning (SIGKILL, a lost node) keeps the time of its last checkpoint. A fresh start at
step 0 begins a new history: earlier attempts left nothing this run uses.
"""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

import mythos
from mythos.config import dump_yaml, to_dict
from mythos.io import atomic_write_text
from mythos.run_dir import DS_CONFIG, RESOLVED_CONFIG, RUN_INFO
from mythos.train.config import RunConfig
from mythos.train.ds_config import write_ds_config

# the facts that may change from one segment to the next (a resume on another world size, a
# newer commit, another node); copied from the record into its segment
SEGMENT_FACTS = ("world_size", "zero_stage", "git_commit", "host", "resumed_from", "torch", "deepspeed", "bf16")


def section_hash(obj: Any) -> str:
    """16 hex digits identifying a config section (sorted-key JSON of its dataclass)."""
    return hashlib.sha256(json.dumps(to_dict(obj), sort_keys=True).encode()).hexdigest()[:16]


def git_commit(where: Path = Path(__file__).parent) -> str:
    """``git rev-parse HEAD`` of the checkout holding ``where``; "unknown" outside a checkout."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True,
                              timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_info(cfg: RunConfig, **facts: Any) -> dict[str, Any]:
    """The ``run_info.json`` record: identity and versions, then the caller's ``facts`` (world
    size, ZeRO stage, data hash/fingerprint, params, FLOPs per token, resume point, ...)."""
    import deepspeed

    return {
        "name": cfg.name,
        "kind": cfg.model.kind,
        "git_commit": git_commit(),
        "mythos_version": mythos.__version__,
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "model_hash": section_hash(cfg.model),
        **facts,
        "start_time": time.time(),
    }


def with_segments(info: dict[str, Any], previous: dict[str, Any] | None, start_step: int) -> dict[str, Any]:
    """``info`` with its ``segments`` history: ``previous``'s (the record of the run being resumed;
    None for a fresh start) plus a new open segment starting now at ``start_step``. A previous
    record from before segments existed becomes one segment (its end unknown)."""
    history: list[dict[str, Any]] = []
    if previous is not None:
        history = [dict(s) for s in previous.get("segments") or []]
        if not history and "start_time" in previous:
            history = [{"start_time": previous["start_time"], "start_step": 0,
                        **{k: previous[k] for k in SEGMENT_FACTS if k in previous}}]
    now = {"start_time": info["start_time"], "start_step": start_step, "end_time": None, "end_step": None,
           **{k: info[k] for k in SEGMENT_FACTS if k in info}}
    history.append(now)
    return {**info, "start_time": history[0]["start_time"], "segments": history}


def read_run_info(run_dir: Path) -> dict[str, Any] | None:
    """The run's ``run_info.json`` record, or None when there is none (or it is unreadable: the
    history then starts over rather than the run failing on its own bookkeeping)."""
    try:
        return json.loads((run_dir / RUN_INFO).read_text())
    except (OSError, ValueError):
        return None


def end_segment(run_dir: Path, step: int) -> None:
    """Mark the current (last) segment as having reached ``step`` now (rank 0, at each checkpoint
    and when training ends); an atomic rewrite, so a kill mid-write leaves the previous record."""
    info = read_run_info(run_dir)
    if not info or not info.get("segments"):
        return
    info["segments"][-1].update(end_time=time.time(), end_step=step)
    atomic_write_text(run_dir / RUN_INFO, json.dumps(info, indent=2) + "\n")


def write_run_files(run_dir: Path, cfg: RunConfig, ds_config: dict[str, Any], info: dict[str, Any]) -> None:
    """Atomically write the three provenance files into ``run_dir`` (created if needed)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / RESOLVED_CONFIG, dump_yaml(cfg))
    write_ds_config(ds_config, run_dir / DS_CONFIG)
    atomic_write_text(run_dir / RUN_INFO, json.dumps(info, indent=2) + "\n")
