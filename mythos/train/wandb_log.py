"""Optional Weights & Biases sink for :class:`mythos.train.metrics.MetricsLogger` (rank 0 only).

``wandb`` is not a dependency: it is imported only when ``log.wandb.mode`` is not ``disabled``,
and :func:`check_wandb` (run with the other pre-flight checks, before any process group) turns a
missing package into one line. The run id is a function of the run (absolute ``run_dir`` + name),
so a requeued SLURM job or any later resume continues the *same* W&B run (``resume="allow"``).
W&B only accepts increasing steps: after a resume from an older checkpoint, the steps the killed
attempt had already logged past it are kept by W&B and the repeated ones are dropped (with its
warning); TensorBoard and ``metrics.jsonl`` are rewound exactly.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
from pathlib import Path
from typing import Any

from mythos.config import ConfigError
from mythos.train.config import WandbConfig

INSTALL_HINT = "pip install wandb"


def check_wandb(cfg: WandbConfig) -> None:
    """One-line :class:`ConfigError` when W&B is enabled but not installed."""
    if cfg.mode != "disabled" and importlib.util.find_spec("wandb") is None:
        raise ConfigError(f"log.wandb.mode={cfg.mode} needs the wandb package: {INSTALL_HINT} "
                          f"(or set log.wandb.mode=disabled)")


def run_id(run_dir: str | Path, name: str) -> str:
    """Stable W&B run id: the same run dir and name always map to the same run."""
    key = f"{Path(run_dir).resolve()}\0{name}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


class WandbSink:
    """One W&B run, created or resumed at construction; :meth:`log` takes the logger's scalars."""

    def __init__(self, cfg: WandbConfig, run_dir: Path, name: str, config: dict[str, Any]) -> None:
        check_wandb(cfg)
        import wandb

        self.id = run_id(run_dir, name)
        try:
            self.run = wandb.init(
                project=cfg.project, entity=cfg.entity or None, mode=cfg.mode, id=self.id, resume="allow",
                name=name, dir=str(run_dir), config=config, tags=list(cfg.tags) or None,
                # console="off": keep stdout/stderr ours (the launcher and SLURM read them; one error line)
                settings=wandb.Settings(console="off"),
            )
        except Exception as exc:  # e.g. online without `wandb login`: one line, not a traceback
            first = (str(exc).strip().splitlines() or [""])[0]
            raise ConfigError(f"wandb.init failed ({type(exc).__name__}: {first}); "
                              f"run `wandb login`, or set log.wandb.mode=offline or disabled") from None

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log({k: v for k, v in scalars.items() if math.isfinite(v)}, step=step)

    def close(self) -> None:
        self.run.finish()
