"""Run provenance: what ran, where, on which code and data -- written by rank 0 at start-up.

``RUN_DIR/config.resolved.yaml`` (the exact config), ``ds_config.json`` (the derived DeepSpeed
config) and ``run_info.json`` (versions, git commit, world size, data hash and fingerprint, model
hash, parameter count, FLOPs per token, ...). ``launch/compare.py`` reads ``run_info.json`` to
decide whether two runs are comparable; ``section_hash`` of the model section is also stored in
every checkpoint, so resuming with a different model is refused.
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
from mythos.train.config import RunConfig
from mythos.train.ds_config import write_ds_config


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


def write_run_files(run_dir: Path, cfg: RunConfig, ds_config: dict[str, Any], info: dict[str, Any]) -> None:
    """Atomically write the three provenance files into ``run_dir`` (created if needed)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.resolved.yaml", dump_yaml(cfg))
    write_ds_config(ds_config, run_dir / "ds_config.json")
    atomic_write_text(run_dir / "run_info.json", json.dumps(info, indent=2) + "\n")
