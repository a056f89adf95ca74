"""What a run actually consumed, and test-only fault injection.

**Consumed-data record** (always on). Every rank reduces the sample ids it *trained on* in a step
to a checksum -- the sum of a 31-bit hash of each id, exact in the fp64 all-reduce the step already
makes (up to 2^22 samples per step) -- so after that all-reduce every rank knows the checksum of
the whole global batch as consumed. It must equal the checksum of the step's samples in the
loader's global order (computed locally, no communication); a mismatch stops the run (a loader or
layout bug would otherwise train on the wrong data silently). Rank 0 chains the checksums into a
running sha256 and appends ``{"step", "samples", "sha"}`` to ``RUN_DIR/consumed.jsonl`` at every
log step; the chain state travels in the checkpoint, so a resumed run continues it. Two runs whose
records agree at a step consumed the same samples, in the same step order, up to that step
(``launch/compare.py`` checks this).

**Sample log** (``train.log_samples``, for audits and tests): rank 0 appends each step's full
global sample ids and the ids it received itself to ``RUN_DIR/samples.jsonl``.

**Forward fault** (``train.inject_inf_forward_steps``, tests only): a forward hook makes rank 0's
first transformer block (the RDT's first core block, inside the loop) emit an inf at those steps,
so the NaN guard is exercised by a non-finite value that arises inside the forward.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mythos.io import atomic_write_text
from mythos.run_dir import CONSUMED, SAMPLES

_GENESIS = hashlib.sha256(b"mythos consumed-data record v1").hexdigest()


def ids_checksum(ids: np.ndarray | torch.Tensor) -> float:
    """Sum of a 31-bit splitmix64 hash of each sample id (an order-independent multiset checksum;
    exact as a float64 while the batch has fewer than 2^22 samples)."""
    x = np.asarray(ids, dtype=np.uint64)
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps by design
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return float((x >> np.uint64(33)).sum())


def _trim_jsonl(path: Path, last_step: int) -> None:
    """Drop lines written after ``last_step`` (a crashed run's tail, before a resume)."""
    if path.exists():
        keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= last_step]
        atomic_write_text(path, "".join(ln + "\n" for ln in keep))


class ConsumedRecord:
    """The running record of consumed samples (see the module docstring)."""

    def __init__(self, run_dir: Path, *, enabled: bool) -> None:
        self.path = run_dir / CONSUMED
        self.enabled = enabled
        self.sha = _GENESIS
        self.samples = 0
        self._pending = False

    def state_dict(self) -> dict[str, Any]:
        return {"sha": self.sha, "samples": self.samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The chain of a checkpoint (``{}``: one from before the record, the chain starts again)."""
        self.sha = state.get("sha", _GENESIS)
        self.samples = int(state.get("samples", 0))
        self._pending = False

    def rewind(self, step: int) -> None:
        """Drop the rows written after ``step`` (a crashed or rolled-back run's tail)."""
        if self.enabled:
            _trim_jsonl(self.path, step)

    def add(self, step: int, consumed: float, expected: float, n_samples: int) -> None:
        """Fold step ``step``'s global checksum in; raises if it is not the expected one."""
        if consumed != expected:
            raise RuntimeError(
                f"step {step}: the ranks trained on samples that differ from the data order (checksum "
                f"{consumed:.0f} != {expected:.0f}); a loader/layout bug -- stopping before training on wrong data"
            )
        self.sha = hashlib.sha256(bytes.fromhex(self.sha) + struct.pack("<qd", step, consumed)).hexdigest()
        self.samples += n_samples
        self._pending = True

    def flush(self, step: int, skipped_updates: int = 0, skipped_batches: int = 0) -> None:
        """Append the record at ``step`` (rank 0, at log steps). ``skipped_updates`` (steps whose
        batch was consumed but whose update was dropped: non-finite or spike) and
        ``skipped_batches`` (batches a rollback passed over) are cumulative and written when
        nonzero: a run with either did not learn from the same data as its pair."""
        if self.enabled and self._pending:
            row: dict[str, Any] = {"step": step, "samples": self.samples, "sha": self.sha}
            if skipped_updates:
                row["skipped_updates"] = skipped_updates
            if skipped_batches:
                row["skipped_batches"] = skipped_batches
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            self._pending = False


def read_consumed_rows(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of a run's ``consumed.jsonl`` (empty when the run predates the record)."""
    path = Path(run_dir) / CONSUMED
    if not path.exists():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r]


def read_consumed(run_dir: Path) -> dict[int, str]:
    """``step -> sha`` of a run's ``consumed.jsonl`` (empty when the run predates the record)."""
    return {r["step"]: r["sha"] for r in read_consumed_rows(run_dir)}


class SampleLog:
    """``train.log_samples``: every step's global sample ids (+ rank 0's own) in samples.jsonl."""

    def __init__(self, run_dir: Path, *, enabled: bool) -> None:
        self.path, self.enabled = run_dir / SAMPLES, enabled

    def rewind(self, step: int) -> None:
        """Drop the rows written after ``step``."""
        if self.enabled:
            _trim_jsonl(self.path, step)

    def add(self, step: int, global_ids: Sequence[int], mine: Sequence[int]) -> None:
        if self.enabled:
            rec = {"step": step, "ids": sorted(int(i) for i in global_ids), "rank0": sorted(int(i) for i in mine)}
            with self.path.open("a") as f:
                f.write(json.dumps(rec) + "\n")


def install_forward_fault(module: torch.nn.Module, steps: Sequence[int], next_step: Callable[[], int]) -> None:
    """Test-only: make ``module``'s first block (RDT: first core block) emit an inf in training
    when ``next_step()`` (the 1-based step being computed) is in ``steps``."""
    from mythos.model.layers import Block

    block = module.core[0] if hasattr(module, "core") else next(m for m in module.modules() if isinstance(m, Block))

    def hook(mod: torch.nn.Module, args: Any, output: tuple[torch.Tensor, Any]) -> Any:
        x, aux = output
        if not (mod.training and next_step() in steps and x.numel()):
            return None
        x = x.clone()
        x.view(-1)[0] = float("inf")
        return x, aux

    block.register_forward_hook(hook)
