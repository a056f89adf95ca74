"""Loss-spike detection and the rollback record.

**Detection** (:class:`SpikeDetector`). The step's global loss is already on the host on every
rank (the step's one all-reduce, :meth:`mythos.train.trainer.Trainer.train_step`), identical on
all of them, so flagging costs no communication and no extra device sync, and every rank takes
the same decision. A step is flagged when ``loss > mean + sigma * std`` of the last ``window``
*unflagged* losses (one-sided: a loss that falls fast is progress, not a spike), once
``min_history`` of them exist. The window travels in the checkpoint, so a resumed run flags
exactly what the uninterrupted one would. Grad-norm spikes are not acted on: DeepSpeed computes
the norm inside ``engine.step()``, after the update is decided (the norm is logged as always).

**Skip.** A flagged step's update is skipped the way a non-finite one is: the last micro-batch's
loss is made non-finite before its backward, so DeepSpeed's overflow check drops the whole update
(ZeRO 1-3; ZeRO-0 through the trainer's own path) and the optimizer state is untouched.

**Rollback record** (``RUN_DIR/rollbacks.json``, :class:`RollbackLog`). Each rollback appends
``{"detected_at", "flagged_steps", "checkpoint", "to_step", "skip_from_step", "skip_batches",
"lr_factor"}``. The trainer applies the record on every start that resumes (the batches are
skipped when step ``skip_from_step`` is reached, the lr factor holds from that step on), so a
fresh resume from the rollback's checkpoint reproduces the rolled-back run bit for bit. A fresh
start at step 0 begins a new record.
"""

from __future__ import annotations

import json
import math
from collections import deque
from pathlib import Path
from typing import Any

from mythos.io import atomic_write_text
from mythos.run_dir import ROLLBACKS, list_tags
from mythos.train import checkpoint as ckpt
from mythos.train.config import SpikeConfig


class SpikeDetector:
    """Rolling mean / std of recent unflagged losses; :meth:`check` flags a spike, :meth:`record`
    keeps the streak of flagged steps in a row (what a rollback acts on)."""

    def __init__(self, cfg: SpikeConfig, state: dict[str, Any] | None = None) -> None:
        self.cfg = cfg
        self.history: deque[float] = deque(maxlen=cfg.window)
        self.flagged_total = 0
        self.last_z = 0.0
        self.streak: list[int] = []  # the flagged steps, in a row, up to the last step
        if state:
            self.load_state_dict(state)

    def check(self, loss: float) -> bool:
        """True when ``loss`` is a spike; an unflagged finite loss joins the window."""
        if self.cfg.action == "off" or not math.isfinite(loss):
            return False  # non-finite losses are the NaN guard's (train.max_bad_steps)
        flagged = False
        if len(self.history) >= self.cfg.min_history:
            n = len(self.history)
            mean = sum(self.history) / n
            std = math.sqrt(sum((x - mean) ** 2 for x in self.history) / (n - 1))
            # a floor on std: a window of near-identical losses must not flag the next wiggle
            self.last_z = (loss - mean) / max(std, 1e-3 * abs(mean), 1e-8)
            flagged = self.last_z > self.cfg.sigma
        if flagged:
            self.flagged_total += 1
        else:
            self.history.append(loss)
        return flagged

    def record(self, step: int, flagged: bool) -> None:
        """Step ``step`` was (or was not) flagged: extend or end the streak."""
        self.streak = [*self.streak, step] if flagged else []

    @property
    def rollback_due(self) -> bool:
        """``train.spike.rollback_after`` flagged steps in a row under ``action: rollback``."""
        return self.cfg.action == "rollback" and len(self.streak) >= self.cfg.rollback_after

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "flagged_total": self.flagged_total, "streak": list(self.streak)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = deque((float(x) for x in state.get("history", [])), maxlen=self.cfg.window)
        self.flagged_total = int(state.get("flagged_total", 0))
        self.streak = [int(s) for s in state.get("streak", [])]
        self.last_z = 0.0  # a z-score of the steps before the checkpoint is not this window's


class RollbackImpossible(RuntimeError):
    """No rollback is possible (no good checkpoint, or the cap reached); one line saying so."""


def plan_rollback(ckpt_root: Path, flagged: list[int], events: list[dict[str, Any]], cfg: SpikeConfig,
                  step: int) -> tuple[Path, dict[str, Any]]:
    """``(checkpoint, event)`` of the rollback after the flagged steps ``flagged`` (1-based, in a
    row, the last one ``step``): the newest complete checkpoint before ``flagged[0]`` that
    verifies (sizes and sha256, as a resume checks). Raises :class:`RollbackImpossible` when
    there is none, or ``cfg.max_rollbacks`` rollbacks were made already."""
    good = [(s, d) for s, d in list_tags(ckpt_root) if s < flagged[0] and ckpt.verify(d) is None]
    if len(events) >= cfg.max_rollbacks or not good:
        where = good[-1][1] if good else "none before the spike"
        why = (f"{len(events)} rollbacks already (train.spike.max_rollbacks={cfg.max_rollbacks})" if good
               else "no complete checkpoint before the spike to roll back to (lower train.save_interval)")
        raise RollbackImpossible(f"stopping: loss spikes at steps {flagged} and {why}; last good checkpoint: "
                                 f"{where}; lower optim.lr or check the data")
    to_step, path = good[-1]
    return path, {"detected_at": step, "flagged_steps": list(flagged), "checkpoint": path.name, "to_step": to_step,
                  "skip_from_step": flagged[0], "skip_batches": len(flagged) if cfg.skip_batches else 0,
                  "lr_factor": cfg.lr_factor}


class RollbackLog:
    """The run's rollbacks (see the module docstring); rank 0 writes, every rank applies."""

    def __init__(self, run_dir: Path, *, enabled: bool, resuming: bool) -> None:
        self.path = run_dir / ROLLBACKS
        self.enabled = enabled
        self.events: list[dict[str, Any]] = []
        if resuming:
            self.events = read_rollbacks(run_dir)
        elif enabled and self.path.exists():
            self.path.unlink()  # a fresh start: an older attempt's record does not apply

    def add(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        if self.enabled:
            atomic_write_text(self.path, json.dumps(self.events, indent=2) + "\n")

    def skips_at(self, step: int) -> int:
        """Global batches to skip before drawing the batch of (1-based) step ``step``."""
        return sum(e["skip_batches"] for e in self.events if e["skip_from_step"] == step)

    def lr_factor(self, step: int) -> float:
        """The product of the lr factors of the rollbacks in force at (1-based) step ``step``."""
        f = 1.0
        for e in self.events:
            if step >= e["skip_from_step"]:
                f *= e["lr_factor"]
        return f


def read_rollbacks(run_dir: Path) -> list[dict[str, Any]]:
    """A run's rollback events (empty when it has none)."""
    path = Path(run_dir) / ROLLBACKS
    return json.loads(path.read_text()) if path.is_file() else []
