"""Save-and-exit on SIGTERM / SIGUSR1 (SLURM's pre-timeout warning, preemption).

The handler only sets a flag: saving inside a signal handler would race the training step, and
ranks receive signals at different moments. The trainer all-reduces the flag at the next step
boundary, so every rank saves the *same* step and exits together.
"""

from __future__ import annotations

import signal
from types import FrameType


class StopFlag:
    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGUSR1)) -> None:
        self.signum: int | None = None
        self._previous = {}
        for s in signals:
            self._previous[s] = signal.signal(s, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum

    @property
    def raised(self) -> bool:
        return self.signum is not None

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
