"""One logging path for training metrics: TensorBoard + ``metrics.jsonl`` + a console line, and
optionally Weights & Biases (``log.wandb``; :mod:`mythos.train.wandb_log`) with the same scalars.

Only rank 0 writes. On resume, TensorBoard's ``purge_step`` hides events the crashed run wrote
after the checkpoint, and ``metrics.jsonl`` is rewritten to drop those steps, so every step
appears exactly once in both (plots of a resumed run are not doubled back on themselves).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mythos.io import atomic_write_text
from mythos.run_dir import METRICS, TENSORBOARD

if TYPE_CHECKING:
    from mythos.train.config import WandbConfig


class MetricsLogger:
    def __init__(self, run_dir: Path, *, enabled: bool, tensorboard: bool, console: bool, resume_step: int,
                 wandb: WandbConfig | None = None, run_name: str = "run", run_config: dict[str, Any] | None = None,
                 interval: int = 1) -> None:
        """``enabled``: this rank writes (rank 0). ``interval``: ``train.log_interval`` (see
        :meth:`due`). ``wandb``: ``log.wandb``; when its mode is not
        ``disabled`` a W&B run named ``run_name`` (id derived from ``run_dir`` + name, so a resume
        continues it) gets the same scalars, with ``run_config`` as its config."""
        self.enabled, self.console, self.interval = enabled, console, interval
        self.jsonl = run_dir / METRICS
        self.writer = None
        self.wandb = None
        if not enabled:
            return
        self._tensorboard_dir = run_dir / TENSORBOARD if tensorboard else None
        self._open(resume_step)
        if wandb is not None and wandb.mode != "disabled":
            from mythos.train.wandb_log import WandbSink  # imports wandb: only when enabled

            self.wandb = WandbSink(wandb, run_dir, run_name, run_config or {})

    def due(self, step: int, total_steps: int, *, force: bool = False) -> bool:
        """Log this step: every ``interval`` steps, the last step, and ``force`` (a step whose
        update was dropped is always logged)."""
        return step % self.interval == 0 or step == total_steps or force

    def _open(self, resume_step: int) -> None:
        """Drop what was logged after ``resume_step`` (jsonl rewritten, TensorBoard purged) and open."""
        if self.jsonl.exists():
            keep = [ln for ln in self.jsonl.read_text().splitlines() if ln and json.loads(ln)["step"] <= resume_step]
            atomic_write_text(self.jsonl, "".join(ln + "\n" for ln in keep))
        if self._tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            purge = resume_step + 1 if resume_step else None
            self.writer = SummaryWriter(str(self._tensorboard_dir), purge_step=purge)
        self._file = self.jsonl.open("a")

    def rewind(self, step: int) -> None:
        """A rollback to ``step`` inside the run: every step is again logged once, as after a
        resume. (W&B keeps its rows: it does not take steps back; the rolled-back steps follow.)"""
        if not self.enabled:
            return
        if self.writer is not None:
            self.writer.close()
        self._file.close()
        self._open(step)

    def log(self, step: int, scalars: dict[str, float], *, histograms: dict[str, Any] | None = None) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in scalars.items()}
        if self.writer is not None:
            for k, v in clean.items():
                if math.isfinite(v):
                    self.writer.add_scalar(k, v, step)
            for k, values in (histograms or {}).items():
                self.writer.add_histogram(k, values, step)
            self.writer.flush()
        if self.wandb is not None:
            self.wandb.log(step, clean)
        self._file.write(json.dumps({"step": step, "time": time.time(), **clean}) + "\n")
        self._file.flush()

    def print(self, line: str) -> None:
        if self.enabled and self.console:
            print(line, file=sys.stdout, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.close()
        self._file.close()


def format_line(step: int, total: int, m: dict[str, float], eta_s: float) -> str:
    """nanochat-style: ``step 000120/001000 (12.0%) | loss 3.412 | lr 2.9e-04 | ...``."""
    parts = [f"step {step:06d}/{total:06d} ({100 * step / max(total, 1):.1f}%)", f"loss {m['train/loss']:.4f}"]
    parts.append(f"lr {m['train/lr']:.2e}")
    if "train/grad_norm" in m:
        parts.append(f"gnorm {m['train/grad_norm']:.3f}")
    parts.append(f"dt {1000 * m['perf/step_time_s']:.0f}ms")
    parts.append(f"tok/s {_si(m['perf/tokens_per_s'])}")
    if "perf/mfu" in m:
        parts.append(f"mfu {100 * m['perf/mfu']:.1f}%")
    if "rdt/loops_mean" in m:
        parts.append(f"r {m['rdt/loops_mean']:.1f}")
    h, rem = divmod(int(eta_s), 3600)
    parts.append(f"eta {h}h{rem // 60:02d}m")
    return " | ".join(parts)


def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


@torch.no_grad()
def spectral_radius(module: torch.nn.Module, zero_stage: int) -> float:
    """The RDT injection's spectral radius (ZeRO-3: gathered from its partitions for the read)."""
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.injection.parameters())):
            return float(module.spectral_radius())
    return float(module.spectral_radius())


def memory_gb(cuda: bool) -> float:
    """Peak memory of this process: CUDA allocations on GPU, max RSS on CPU (GiB)."""
    if cuda:
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
