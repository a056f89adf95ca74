"""What a checkpoint holds besides the engine's tensors: the run's stateful components.

torchtitan's habit: every piece of state a resume must restore is a component with
``state_dict()`` / ``load_state_dict()``, and the checkpoint's client state is their union -- no
key is written or read by hand elsewhere. :class:`Progress` (the counters) puts its keys at the
top level; the others sit under their name: ``data`` (the loader's position), ``consumed`` (the
consumed-data chain, :class:`mythos.train.audit.ConsumedRecord`), ``spikes`` (the spike window
and streak, :class:`mythos.train.spikes.SpikeDetector`). ``model_hash`` and ``data_fingerprint``
are the run's identity: :class:`TrainState` writes them and checks them before anything loads.

:class:`Checkpointer` owns when the run saves (``train.save_interval`` and the last step), where
(``run_dir/checkpoints``, the newest ``train.keep_last`` kept) and loading a tag back into the
engine and the components.

``CLIENT_KEYS`` is the written contract of the client state: exactly these keys, in this order
(the order earlier versions wrote, so the pickled client state is byte-identical across them).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from mythos.run_dir import checkpoints
from mythos.train import checkpoint as ckpt
from mythos.train.config import TrainConfig
from mythos.train.provenance import end_segment

CLIENT_KEYS = ("step", "data", "tokens_seen", "flops_seen", "bad_steps_total", "skipped_total",
               "data_fingerprint", "model_hash", "consumed", "spikes")


class Stateful(Protocol):
    """A component a checkpoint saves and a resume (or a rollback) restores."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class Progress:
    """The run's counters after ``step`` optimizer steps: tokens and model FLOPs trained on,
    steps whose update was dropped for a non-finite loss (``bad_steps_total``) and all dropped
    updates, spikes included (``skipped_total``)."""

    step: int = 0
    tokens_seen: int = 0
    flops_seen: float = 0.0
    bad_steps_total: int = 0
    skipped_total: int = 0

    def advance(self, tokens: int, flops: float, *, bad: bool, skipped: bool) -> None:
        """Count one optimizer step of ``tokens`` tokens and ``flops`` model FLOPs."""
        self.step += 1
        self.tokens_seen += tokens
        self.flops_seen += flops
        self.bad_steps_total += int(bad)
        self.skipped_total += int(skipped)

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.flops_seen = float(state["flops_seen"])
        # checkpoints from before the NaN guard / spike handling lack these counters
        self.bad_steps_total = int(state.get("bad_steps_total", 0))
        self.skipped_total = int(state.get("skipped_total", 0))


class TrainState:
    """The checkpoint's client state as components: ``progress`` (flat keys) and ``nested``
    (each under its key), stamped with the run's identity (``model_hash``, ``data_fingerprint``)."""

    def __init__(self, progress: Progress, nested: dict[str, Stateful], *, model_hash: str,
                 data_fingerprint: str) -> None:
        self.progress = progress
        self.nested = nested
        self.identity = {"data_fingerprint": data_fingerprint, "model_hash": model_hash}

    def state_dict(self, **replace: dict[str, Any]) -> dict[str, Any]:
        """The client state (``CLIENT_KEYS``, in order); ``replace`` swaps a nested component's
        state for a given one (a signal save records the loader position from before the step)."""
        parts = {**self.progress.state_dict(), **self.identity,
                 **{key: c.state_dict() for key, c in self.nested.items()}, **replace}
        if set(parts) != set(CLIENT_KEYS):  # a component added without updating the contract
            raise RuntimeError(f"client state keys {sorted(parts)} differ from CLIENT_KEYS {sorted(CLIENT_KEYS)}")
        return {key: parts[key] for key in CLIENT_KEYS}

    def load_state_dict(self, client: dict[str, Any], path: Path) -> None:
        """Refuse another model or data order (one line naming ``path``), then restore every
        component; a nested key missing from an older checkpoint restores that component's
        fresh state."""
        ckpt.check_identity(client, path, model_hash=self.identity["model_hash"],
                            data_fingerprint=self.identity["data_fingerprint"])
        self.progress.load_state_dict(client)
        for key, component in self.nested.items():
            component.load_state_dict(client.get(key) or {})


class Checkpointer:
    """Saves and loads the run's checkpoints: the engine's tensors (:mod:`mythos.train.checkpoint`:
    atomic, verified) plus ``state``'s client state. Rank 0 closes the run's segment in
    ``run_info.json`` at each save (the time a preempted job ran is known without its logs)."""

    def __init__(self, engine: Any, run_dir: Path, train: TrainConfig, state: TrainState, *, is_main: bool) -> None:
        self.engine, self.run_dir, self.state, self.is_main = engine, run_dir, state, is_main
        self.root = checkpoints(run_dir)
        self.interval, self.keep_last = train.save_interval, train.keep_last

    def due(self, step: int, total_steps: int) -> bool:
        """Every ``train.save_interval`` steps (0: never) and at the last step."""
        return bool(self.interval and step % self.interval == 0) or step == total_steps

    def save(self, data_state: dict[str, Any] | None = None) -> Path:
        """Checkpoint the current step; ``data_state`` replaces the loader's position (a signal
        save resumes at the batch it did not train on)."""
        client = self.state.state_dict(**({"data": data_state} if data_state else {}))
        step = self.state.progress.step
        path = ckpt.save(self.engine, self.root, step, client, self.keep_last)
        if self.is_main:
            end_segment(self.run_dir, step)
        return path

    def load(self, path: Path, *, universal: bool = False, restore_rng: bool = True) -> dict[str, Any]:
        """Load tag ``path`` into the engine, refuse another model or data order, restore every
        component (resume and rollback alike); returns the client state."""
        client = ckpt.load(self.engine, path, universal=universal, restore_rng=restore_rng)
        self.state.load_state_dict(client, path)
        return client
