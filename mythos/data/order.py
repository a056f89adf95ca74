"""The global sample order: which samples form global batch ``t``, independent of parallelism.

Invariant (the reason this module exists): the list of sample indices of every optimizer step
depends only on ``(num_samples, seed, epoch, global_batch_size)``. World size and DataLoader
workers only decide *who* loads which part of a batch (OLMo's lesson: an order that depends on
the number of workers breaks exact resume and matched comparisons).

- Epoch ``e`` uses ``permutation(num_samples)`` from ``Generator(PCG64(SeedSequence([seed, e])))``
  (or the identity with ``shuffle=False``).
- A *position* is ``(epoch, offset)``: the next sample is ``perm_e[offset]``. A step consumes
  ``perm_e[offset : offset + B]``; when fewer than ``B`` samples remain the tail is dropped and
  the next epoch starts at offset 0 (every step sees exactly ``B`` distinct samples).
- Rank ``r`` of ``W`` takes the contiguous slice ``[r * B/W, (r+1) * B/W)`` of the global batch,
  cut into micro-batches of ``m`` (so rank-order concatenation is the global batch itself) -- or of
  a per-step permutation of its positions when the loader has a layout (the RDT groups samples of
  similar loop count, :mod:`mythos.train.loop_layout`); the batch's set of samples is the same.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mythos.config import ConfigError


@dataclasses.dataclass(frozen=True)
class Position:
    epoch: int = 0
    offset: int = 0


class GlobalOrder:
    def __init__(self, num_samples: int, seed: int, global_batch_size: int, shuffle: bool = True):
        if global_batch_size < 1:
            raise ConfigError(f"global batch size must be >= 1, got {global_batch_size}")
        if num_samples < global_batch_size:
            raise ConfigError(
                f"global batch size {global_batch_size} exceeds the {num_samples} training samples "
                f"(lower the batch size or add data)"
            )
        self.num_samples = num_samples
        self.seed = seed
        self.global_batch_size = global_batch_size
        self.shuffle = shuffle
        self._cached: tuple[int, np.ndarray] | None = None

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch_size

    def permutation(self, epoch: int) -> np.ndarray:
        """Sample indices of ``epoch`` in training order (cached for the current epoch)."""
        if self._cached is None or self._cached[0] != epoch:
            if self.shuffle:
                rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch])))
                perm = rng.permutation(self.num_samples)
            else:
                perm = np.arange(self.num_samples)
            self._cached = (epoch, perm.astype(np.int64))
        return self._cached[1]

    def normalize(self, pos: Position) -> Position:
        """Roll over to the next epoch when the remaining samples cannot fill a batch."""
        if pos.offset + self.global_batch_size > self.num_samples:
            return Position(pos.epoch + 1, 0)
        return pos

    def position(self, step: int) -> Position:
        """Where step ``step`` starts (steps run from Position(0, 0); a pure function of the step)."""
        spe = self.steps_per_epoch
        return Position(step // spe, (step % spe) * self.global_batch_size)

    def global_batch(self, pos: Position) -> np.ndarray:
        """``int64 [B]``: the samples of the step starting at ``pos`` (already normalized)."""
        pos = self.normalize(pos)
        return self.permutation(pos.epoch)[pos.offset : pos.offset + self.global_batch_size]

    def advance(self, pos: Position) -> Position:
        pos = self.normalize(pos)
        return self.normalize(Position(pos.epoch, pos.offset + self.global_batch_size))


def rank_slice(global_batch: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Rank ``rank``'s contiguous share of a global batch (``B % world_size == 0`` is checked by
    the loader at construction)."""
    per_rank = len(global_batch) // world_size
    return global_batch[rank * per_rank : (rank + 1) * per_rank]


def check_batch_geometry(global_batch_size: int, micro_batch_size: int, world_size: int) -> int:
    """Validate ``B = W * m * accum`` and return the gradient accumulation steps ``accum``."""
    if world_size < 1 or micro_batch_size < 1:
        raise ConfigError(f"world_size ({world_size}) and micro_batch_size ({micro_batch_size}) must be >= 1")
    if global_batch_size % world_size:
        raise ConfigError(
            f"global batch size {global_batch_size} is not divisible by world size {world_size}; "
            f"choose a batch size that is a multiple of the number of ranks"
        )
    per_rank = global_batch_size // world_size
    if per_rank % micro_batch_size:
        raise ConfigError(
            f"per-rank batch {per_rank} (= {global_batch_size} / {world_size} ranks) is not divisible by "
            f"micro batch size {micro_batch_size}"
        )
    return per_rank // micro_batch_size
