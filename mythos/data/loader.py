"""Train and validation loaders over packed shards, with exact, parallelism-independent resume.

Trainer usage::

    loader = build_train_loader(cfg.data, global_batch_size=B, micro_batch_size=m,
                                rank=rank, world_size=W)
    loader.load_state_dict(ckpt["data"])          # optional: resume
    for step in range(start, total):
        for micro in loader.next_step():          # B / (W * m) micro-batches
            loss = model(micro["input_ids"]).loss(micro["labels"])   # LongTensor [m, L] each
        ckpt["data"] = loader.state_dict()

Guarantees (tested): the samples of step ``t`` depend only on (manifest, seed, B) -- not on
``W``, ``num_workers`` or where a run was resumed; across ranks and workers every sample of an
epoch is used exactly once (the last ``num_samples % B`` of each epoch's permutation are
dropped); ``state_dict`` pins the exact next sample, so a resumed run (any ``W``) continues with
it. Prefetched-but-unconsumed micro-batches are not counted: state advances when
:meth:`TrainLoader.next_step` returns.
"""

from __future__ import annotations

import hashlib
import math
import signal
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from mythos.config import ConfigError
from mythos.data.config import DataConfig
from mythos.data.dataset import PackedSamples
from mythos.data.format import Manifest
from mythos.data.mixture import ResolvedData, resolve_data
from mythos.data.order import GlobalOrder, Position, check_batch_geometry, rank_slice
from mythos.model.loss import IGNORE_INDEX  # the loss's ignore label: one definition

STATE_VERSION = 1

Batch = dict[str, torch.Tensor]


def to_batch(tokens: np.ndarray) -> Batch:
    """``[b, L+1]`` stored tokens -> ``input_ids = x[:, :-1]``, ``labels = x[:, 1:]`` (int64 [b, L]).

    Loss-masked samples ``[b, 2, L+1]`` (tokens, mask) give ``labels = IGNORE_INDEX`` wherever
    the target token's mask is 0 (e.g. everything but a task's answer)."""
    t = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64))
    if t.dim() == 3:
        t, mask = t[:, 0], t[:, 1]
        labels = t[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE_INDEX)
        return {"input_ids": t[:, :-1].contiguous(), "labels": labels.contiguous()}
    return {"input_ids": t[:, :-1].contiguous(), "labels": t[:, 1:].contiguous()}


#: ``layout(step) -> positions [B]``: the order in which a step's global positions are handed
#: out (rank-major, then micro-batch); None keeps position order. See mythos.train.loop_layout.
Layout = Callable[[int], np.ndarray]


class StepHops:
    """``step -> int64 [B]``: the hop count of every global position's sample at ``step`` (for the
    ``hops`` loop schedule). A pure function of the step through the data order, so, like the
    samples themselves, independent of the world size and of where a run resumed. Picklable."""

    def __init__(self, order: GlobalOrder, hops: np.ndarray):
        if len(hops) != order.num_samples:
            raise ValueError(f"{len(hops)} hop counts for {order.num_samples} training samples")
        self.order, self.hops = order, hops

    def __call__(self, step: int) -> np.ndarray:
        return self.hops[self.order.global_batch(self.order.position(step))]


class _MicroBatches(Dataset):
    """Micro-batch ``(epoch, offset, k, step)`` of this rank -> batch. Runs in DataLoader workers;
    the key alone determines the result, so which worker computes it does not matter."""

    def __init__(self, samples: PackedSamples, order: GlobalOrder, rank: int, world_size: int, micro: int,
                 layout: Layout | None):
        self.samples, self.order = samples, order
        self.rank, self.world_size, self.micro = rank, world_size, micro
        self.layout = layout

    def __len__(self) -> int:  # the stream is unbounded; the sampler drives it
        return 1 << 62

    def __getitem__(self, key: tuple[int, int, int, int]) -> Batch:
        epoch, offset, k, step = key
        batch_ids = self.order.global_batch(Position(epoch, offset))
        positions = np.arange(len(batch_ids)) if self.layout is None else self.layout(step)
        mine = rank_slice(positions, self.rank, self.world_size)[k * self.micro : (k + 1) * self.micro]
        out = to_batch(self.samples.get_many(batch_ids[mine]))
        out["positions"] = torch.from_numpy(mine.astype(np.int64))
        out["sample_ids"] = torch.from_numpy(batch_ids[mine].astype(np.int64))
        return out


def _ignore_stop_signals(worker_id: int) -> None:
    """Workers ignore SIGTERM/SIGUSR1: SLURM signals every process of a job step on preemption,
    and torch's worker handler would die on a TERM not sent by its parent, crashing the trainer
    instead of letting it save. The trainer (main process) handles the signal and shuts the
    workers down itself."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def stop_workers(it: Iterator[Any], join_timeout_s: float = 5.0) -> None:
    """Shut the worker processes of a DataLoader iterator down now, deterministically.

    Left to garbage collection, a failed run hangs at exit: the exception's traceback keeps the
    iterator alive past interpreter shutdown, where ``multiprocessing`` SIGTERMs its daemonic
    children and joins them without a timeout -- but our workers ignore SIGTERM
    (:func:`_ignore_stop_signals`), so that join never returns. Torch's own shutdown (done event,
    then a join with a timeout, then SIGTERM) is tried first; a worker still alive after it gets
    SIGKILL, the one signal it cannot ignore. No-op for the in-process stream (``num_workers=0``)."""
    shutdown = getattr(it, "_shutdown_workers", None)
    if shutdown is None:
        return
    workers = list(getattr(it, "_workers", ()))
    try:
        shutdown()
    finally:
        for w in workers:
            if w.is_alive():
                w.kill()
                w.join(timeout=join_timeout_s)


class _StepKeys(Sampler):
    """Yields micro-batch keys from ``start`` (at step ``step``) on, forever, step after step."""

    def __init__(self, order: GlobalOrder, start: Position, accum: int, step: int):
        self.order, self.start, self.accum, self.step = order, start, accum, step

    def __iter__(self) -> Iterator[tuple[int, int, int, int]]:
        pos, step = self.order.normalize(self.start), self.step
        while True:
            for k in range(self.accum):
                yield (pos.epoch, pos.offset, k, step)
            pos, step = self.order.advance(pos), step + 1


class TrainLoader:
    """Micro-batches of one rank, step by step. See the module docstring for the guarantees."""

    def __init__(
        self, cfg: DataConfig, global_batch_size: int, micro_batch_size: int, rank: int = 0, world_size: int = 1,
        layout: Layout | None = None,
    ):
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} out of range for world size {world_size}")
        self.cfg = cfg
        self.layout = layout
        self.rank, self.world_size = rank, world_size
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.grad_accum_steps = check_batch_geometry(global_batch_size, micro_batch_size, world_size)
        # one directory or a mixture (mythos.data.mixture); the first source's manifest gives
        # seq_len, dtype and the token ids, which all sources of a mixture share
        self.data: ResolvedData = resolve_data(cfg)
        self.manifest: Manifest = self.data.manifest
        self.data_hash = self.data.data_hash
        self.samples = self.data.open("train", cfg.verify, cfg.index_cache, seed=cfg.seed)
        self._source_samples = np.zeros(len(self.data.names), dtype=np.int64)
        self.order = GlobalOrder(self.samples.num_samples, cfg.seed, global_batch_size, cfg.shuffle)
        self._pos = Position()
        self._steps = 0
        self._samples_consumed = 0
        self._skipped = 0  # global batches passed over (a rollback's; never trained on)
        self._it: Iterator[Batch] | None = None

    def use_layout(self, layout: Layout | None) -> None:
        """Set the layout (e.g. one built from :meth:`step_hops`) before the first step."""
        if self._it is not None:
            raise RuntimeError("use_layout() after iteration started")
        self.layout = layout

    def step_hops(self) -> StepHops | None:
        """The samples' hop counts by step and global position, or None when the shards record
        none (``sample_hops`` in the manifest: task data) or the data is a mixture."""
        hops = None if self.data.is_mixture else self.manifest.sample_hops("train")
        return None if hops is None else StepHops(self.order, hops)

    # ---- sizes -------------------------------------------------------------------------------
    @property
    def seq_len(self) -> int:
        return self.manifest.seq_len

    @property
    def num_train_samples(self) -> int:
        return self.samples.num_samples

    @property
    def steps_per_epoch(self) -> int:
        return self.order.steps_per_epoch

    @property
    def epoch(self) -> int:
        return self.order.normalize(self._pos).epoch

    # ---- iteration ---------------------------------------------------------------------------
    def _stream(self) -> Iterator[Batch]:
        dataset = _MicroBatches(self.samples, self.order, self.rank, self.world_size, self.micro_batch_size,
                                self.layout)
        keys = _StepKeys(self.order, self._pos, self.grad_accum_steps, self._steps)
        if self.cfg.num_workers == 0:
            return (dataset[k] for k in keys)
        loader = DataLoader(
            dataset,
            sampler=keys,
            batch_size=None,  # keys already name whole micro-batches; results come back in key order
            num_workers=self.cfg.num_workers,
            prefetch_factor=self.cfg.prefetch_factor,
            pin_memory=self.cfg.pin_memory,
            # Our samples need no randomness, and without its own generator the DataLoader draws
            # its worker base seed from the *global* torch RNG, shifting the trainer's random
            # stream (the RDT's h0 noise) whenever an iterator is created, e.g. on resume.
            generator=torch.Generator().manual_seed(0),
            worker_init_fn=_ignore_stop_signals,
        )
        return iter(loader)

    def next_step(self) -> list[Batch]:
        """The ``grad_accum_steps`` micro-batches of this rank for the next optimizer step; each is
        ``{"input_ids": LongTensor [m, L], "labels": LongTensor [m, L], "positions": LongTensor [m],
        "sample_ids": LongTensor [m]}`` (positions in the step's global batch; sample indices in
        the training set, which identify what was consumed)."""
        if self._it is None:
            self._it = self._stream()
        micro = [next(self._it) for _ in range(self.grad_accum_steps)]
        self._source_samples += self.data.source_counts(self.samples, self.order.global_batch(self._pos))
        self._pos = self.order.advance(self._pos)
        self._steps += 1
        self._samples_consumed += self.global_batch_size
        return micro

    def skip(self, n_batches: int) -> None:
        """Pass over the next ``n_batches`` global batches of the order without reading them (a
        rollback's offending batches). The step count does not move: the next :meth:`next_step`
        is the same optimizer step, on the batch after the skipped ones."""
        for _ in range(n_batches):
            self._pos = self.order.advance(self._pos)
        self._skipped += n_batches
        self._it = None  # the stream (and any workers) restart at the new position

    @property
    def skipped_batches(self) -> int:
        """Global batches passed over by :meth:`skip` so far (never trained on)."""
        return self._skipped

    @property
    def batches_drawn(self) -> int:
        """Global batches taken from the order so far, skipped ones included (0-based index of the
        next one)."""
        return self._steps + self._skipped

    def __iter__(self) -> Iterator[list[Batch]]:
        while True:
            yield self.next_step()

    # ---- resume ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        pos = self.order.normalize(self._pos)
        return {
            "version": STATE_VERSION,
            "data_hash": self.data_hash,
            "seed": self.cfg.seed,
            "shuffle": self.cfg.shuffle,
            "epoch": pos.epoch,
            "offset": pos.offset,
            "steps": self._steps,
            "samples_consumed": self._samples_consumed,
            "tokens_consumed": self._samples_consumed * self.seq_len,  # trained positions (seq_len + 1 stored)
            "global_batch_size": self.global_batch_size,
            "source_samples": [int(x) for x in self._source_samples],
            "skipped_batches": self._skipped,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly after the last consumed sample of ``state``. World size, micro batch
        and workers may differ; a different global batch size continues from the same sample."""
        if state.get("version") != STATE_VERSION:
            raise ConfigError(f"data loader state version {state.get('version')!r}, expected {STATE_VERSION}")
        if state["data_hash"] != self.data_hash:
            raise ConfigError(
                f"data loader state was saved for data {state['data_hash'][:12]}, but "
                f"{self.data.description} holds data {self.data_hash[:12]} (resume with the same shards)"
            )
        for key in ("seed", "shuffle"):
            if state[key] != getattr(self.cfg, key):
                raise ConfigError(
                    f"data loader state has {key}={state[key]!r} but data.{key}={getattr(self.cfg, key)!r} "
                    f"(resume with the saved value; changing it would change the data order)"
                )
        if not 0 <= state["offset"] <= self.num_train_samples:
            raise ConfigError(f"data loader state offset {state['offset']} outside the epoch")
        self._pos = Position(int(state["epoch"]), int(state["offset"]))
        self._steps = int(state["steps"])
        self._samples_consumed = int(state["samples_consumed"])
        self._skipped = int(state.get("skipped_batches", 0))  # states from before rollbacks: none
        saved = state.get("source_samples")
        if saved is not None and len(saved) == len(self.data.names):
            self._source_samples = np.array(saved, dtype=np.int64)
        else:  # a state from before per-source counts: recount from the position
            self._source_samples = self._recount_sources()
        self._it = None  # restart the stream (and any workers) at the new position

    # ---- per-source accounting (mixtures) ------------------------------------------------------
    def samples_per_source(self) -> dict[str, int]:
        """Training samples consumed so far from each source, over all ranks (exact)."""
        return {n: int(c) for n, c in zip(self.data.names, self._source_samples)}

    def tokens_per_source(self) -> dict[str, int]:
        """Trained tokens consumed so far from each source, over all ranks: samples x seq_len, the
        measure of ``tokens_consumed`` (sums to it). Identical on every rank, so rank 0 can log it."""
        return {n: c * self.seq_len for n, c in self.samples_per_source().items()}

    def _recount_sources(self) -> np.ndarray:
        """Per-source samples consumed up to the current position, assuming the current global
        batch size throughout (each finished epoch dropped its own tail)."""
        counts = np.zeros(len(self.data.names), dtype=np.int64)
        pos = self.order.normalize(self._pos)
        used = self.order.steps_per_epoch * self.global_batch_size
        for e in range(pos.epoch):
            counts += self.data.source_counts(self.samples, self.order.permutation(e)[:used])
        counts += self.data.source_counts(self.samples, self.order.permutation(pos.epoch)[: pos.offset])
        return counts

    # ---- identity ----------------------------------------------------------------------------
    def fingerprint(self, n_samples: int | None = None) -> str:
        """sha256 over the manifest's data hash and the token ids of the first ``n_samples``
        (default ``cfg.fingerprint_samples``) samples in global training order. Equal
        fingerprints = same data, same order; independent of rank, world size and position."""
        n = self.cfg.fingerprint_samples if n_samples is None else n_samples
        order = GlobalOrder(self.num_train_samples, self.cfg.seed, self.global_batch_size, self.cfg.shuffle)
        h = hashlib.sha256(self.data_hash.encode())
        pos, left = Position(), n
        while left > 0:
            take = order.global_batch(pos)[:left]
            h.update(self.samples.get_many(take).astype("<i8").tobytes())
            left -= len(take)
            pos = order.advance(pos)
        return h.hexdigest()

    def close(self) -> None:
        """Stop the DataLoader workers now (on every exit path of the trainer, errors included) and
        close the shards. Idempotent."""
        it, self._it = self._it, None
        if it is not None:
            stop_workers(it)
        self.samples.close()


class ValLoader:
    """All val samples in stored order, split across ranks without duplication.

    Rank ``r`` takes the contiguous block ``[r*c, min((r+1)*c, N))`` with ``c = ceil(N / W)``,
    padded to ``num_batches * batch_size`` rows. Every rank yields the same number of batches
    (collectives inside an eval step stay matched); padding rows have ``input_ids = pad_id`` and
    ``labels = IGNORE_INDEX`` in every position, so they add no loss and no token count.
    """

    def __init__(self, cfg: DataConfig, batch_size: int, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} out of range for world size {world_size}")
        if batch_size < 1:
            raise ConfigError(f"val batch size must be >= 1, got {batch_size}")
        data = resolve_data(cfg)  # a mixture evaluates on all its sources' val samples, in source order
        self.manifest = data.manifest
        self.samples = data.open("val", cfg.verify, cfg.index_cache)
        self.batch_size = batch_size
        n = self.samples.num_samples
        per_rank = math.ceil(n / world_size)
        self.indices = np.arange(rank * per_rank, min((rank + 1) * per_rank, n), dtype=np.int64)
        self.num_batches = math.ceil(per_rank / batch_size)
        self.num_samples = n
        self.hops = None if data.is_mixture else self.manifest.sample_hops("val")
        """Each val sample's hop count (task shards), handed out as ``batch["hops"]`` (0 on padding)."""

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[Batch]:
        b, width = self.batch_size, self.manifest.seq_len
        for j in range(self.num_batches):
            real = self.indices[j * b : (j + 1) * b]
            batch = to_batch(self.samples.get_many(real)) if len(real) else None
            pad = b - len(real)
            if pad:
                ids = torch.full((pad, width), self.manifest.pad_id, dtype=torch.long)
                lab = torch.full((pad, width), IGNORE_INDEX, dtype=torch.long)
                batch = {"input_ids": ids, "labels": lab} if batch is None else {
                    "input_ids": torch.cat([batch["input_ids"], ids]), "labels": torch.cat([batch["labels"], lab])}
            if self.hops is not None:
                batch["hops"] = torch.from_numpy(np.concatenate([self.hops[real], np.zeros(pad, dtype=np.int64)]))
            yield batch  # type: ignore[misc]


def build_train_loader(
    cfg: DataConfig, global_batch_size: int, micro_batch_size: int, rank: int = 0, world_size: int = 1,
    layout: Layout | None = None,
) -> TrainLoader:
    """Train loader of ``rank`` (of ``world_size``): ``global_batch_size`` samples per step,
    delivered as ``global_batch_size / (world_size * micro_batch_size)`` micro-batches; ``layout``
    chooses which rank and micro-batch gets each position of a step (default: position order)."""
    return TrainLoader(cfg, global_batch_size, micro_batch_size, rank, world_size, layout)


def build_val_loader(cfg: DataConfig, batch_size: int, rank: int = 0, world_size: int = 1) -> ValLoader:
    """Validation loader of ``rank``: fixed order, every val sample exactly once over all ranks."""
    return ValLoader(cfg, batch_size, rank, world_size)
