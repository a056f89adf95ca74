"""The run directory: every name a training run writes, and the checkpoint-tag rules, in one place.

    RUN_DIR/
      config.resolved.yaml   the exact config that ran            (train.provenance)
      ds_config.json         the DeepSpeed config derived from it (train.provenance)
      run_info.json          versions, identity, segments          (train.provenance)
      metrics.jsonl          one row per logged step               (train.metrics)
      tensorboard/           the same scalars                      (train.metrics)
      consumed.jsonl         the consumed-data record              (train.audit)
      samples.jsonl          every step's sample ids (log_samples) (train.audit)
      rollbacks.json         loss-spike rollbacks                  (train.spikes)
      logs/                  SLURM job logs                        (launch/slurm)
      eval/results.json      mythos-eval's results                 (eval.cli)
      checkpoints/stepNNNNNNN/   one DeepSpeed tag per save; it counts only with its COMPLETE
                                 marker (JSON: step, world size, file sizes/sha256, identity)

An exported model directory holds ``model.safetensors`` (+ ``config.yaml``, or the HF files).

Readers and writers import the names from here rather than spelling them; this module imports
nothing of mythos, so every layer (CLI helpers, train/, eval/, the tools) may depend on it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

RESOLVED_CONFIG = "config.resolved.yaml"
DS_CONFIG = "ds_config.json"
RUN_INFO = "run_info.json"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
CONSUMED = "consumed.jsonl"
SAMPLES = "samples.jsonl"
ROLLBACKS = "rollbacks.json"
LOGS = "logs"
EVAL_RESULTS = Path("eval") / "results.json"
CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
EXPORTED_WEIGHTS = "model.safetensors"
"""The weights file of an exported (consolidated or Hugging Face) model directory."""
EXPORTED_CONFIG = "config.yaml"
"""Next to :data:`EXPORTED_WEIGHTS` in a consolidated directory: the resolved model config."""

TAG_RE = re.compile(r"^step(\d{7,})$")


def checkpoints(run_dir: str | Path) -> Path:
    """``RUN_DIR/checkpoints``: the DeepSpeed save directory (one tag per save)."""
    return Path(run_dir) / CHECKPOINTS


def tag_for(step: int) -> str:
    """The tag (directory name) of the checkpoint at ``step``: ``step0000200``."""
    return f"step{step:07d}"


def is_complete(tag_dir: Path) -> bool:
    """A tag counts as a checkpoint only once its ``COMPLETE`` marker exists (written by rank 0
    after every rank finished its files)."""
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


def read_marker(tag_dir: Path) -> dict[str, Any] | None:
    """The ``COMPLETE`` JSON, or None when it cannot be read or parsed."""
    try:
        data = json.loads((tag_dir / COMPLETE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
