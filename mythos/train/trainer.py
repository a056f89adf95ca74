"""The training loop: ``Trainer(cfg).fit()`` with named phases.

Start-up (``__init__``), in this order so that bad input fails before any process group::

    plan     resume point (a checkpoint of another world size is converted here), config checks
    group    process group; model built identically on every rank; DeepSpeed engine (engine.py)
    data     loader (RDT: loop layout, loop_layout.py), val loader, data fingerprint
    resume   engine + checkpointed components (state.py) from the checkpoint; provenance files

One optimizer step (``fit``)::

    data    next micro-batches of this rank
    stop?   all-reduce [label tokens, signal flag, consumed checksum]
            -> token-weighted scale, agreed stop, consumed-data record (audit.py)
    micro   forward/backward x accum (RDT: each sample's T and h0 from (seed, step, position))
    guard   all-reduce [ce sum, non-finite flag]  -> exact step loss; skip bad updates
    step    engine.step() (lr set from the step first), then log / eval / save, each when its own ``due``

Two small all-reduces per step are the only host syncs; metric tensors are read on log steps only.
Throughput / MFU bookkeeping lives in throughput.py.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mythos import dist
from mythos.config import to_dict
from mythos.data import IGNORE_INDEX, build_train_loader, build_val_loader
from mythos.data.order import Position
from mythos.model import build_model
from mythos.model.loops import executed_loops
from mythos.run_dir import ROLLBACKS, checkpoints, list_tags, read_marker
from mythos.train import checkpoint as ckpt
from mythos.train import reshard
from mythos.train.audit import ConsumedRecord, SampleLog, ids_checksum, install_forward_fault
from mythos.train.checks import check_run
from mythos.train.config import RunConfig
from mythos.train.ds_config import build_ds_config, use_bf16
from mythos.train.engine import build_engine, step_without_update, to_device
from mythos.train.loop_layout import LoopLayout, h0_noise
from mythos.train.metrics import MetricsLogger, format_line, memory_gb, spectral_radius
from mythos.train.optim import lr_multiplier, set_lr
from mythos.train.periodic_eval import PeriodicEval
from mythos.train.provenance import (
    end_segment,
    read_run_info,
    run_info,
    section_hash,
    with_segments,
    write_run_files,
)
from mythos.train.signals import StopFlag
from mythos.train.spikes import RollbackImpossible, RollbackLog, SpikeDetector, plan_rollback
from mythos.train.state import Checkpointer, Progress, TrainState
from mythos.train.throughput import Throughput, device_peak_flops


class TrainingStopped(RuntimeError):
    """Raised when the run must stop (too many bad steps); the message says what to do."""


class Trainer:
    """One training run on this rank: :meth:`fit` trains to ``total_steps``. Construction runs the
    phases in order: checks that need no process group (a bad run fails there with one line), the
    process group and engine, the data, the resume, then the per-run components."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        # installed first, so a preemption warning that arrives during start-up (process group,
        # model build, resume) is not lost: the first step boundary acts on it
        self.stop = StopFlag()
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_root = checkpoints(self.run_dir)
        self._preflight()
        self._build_engine()
        self._build_data()
        self._build_state()
        self._maybe_resume()
        self._components()  # the per-run components that continue from the resumed step

    @property
    def step(self) -> int:
        """Optimizer steps done (:class:`Progress` owns the counters)."""
        return self.progress.step

    # ------------------------------------------------------------------ setup
    def _preflight(self) -> None:
        """Everything that can be checked without a process group, first; a checkpoint from
        another world size is checked (own message) and converted here (reshard)."""
        cfg, t, info = self.cfg, self.cfg.train, dist.env_info()
        self.resume_plan = reshard.plan_resume(self.ckpt_root, t.resume, info.world_size,
                                               t.global_batch_size, t.micro_batch_size)
        self.plan = check_run(cfg, info.world_size)
        if self.resume_plan is not None:  # another model: refused before converting or loading anything
            ckpt.check_identity(read_marker(self.resume_plan.path) or {}, self.resume_plan.path,
                                model_hash=section_hash(cfg.model), data_fingerprint=None, require=False)
        reshard.ensure_universal(self.resume_plan, info.rank, t.dist_timeout_s)

    def _build_engine(self) -> None:
        """The process group, the model (identical init on every rank) and the DeepSpeed engine."""
        cfg, t = self.cfg, self.cfg.train
        self.info = dist.init_distributed(t.dist_timeout_s)
        self.device, self.cuda = dist.device(), dist.is_cuda()
        self.total_steps = self.plan["steps"]
        self.accum = t.global_batch_size // (t.micro_batch_size * self.info.world_size)
        torch.manual_seed(t.seed)  # identical init on every rank
        model = build_model(cfg.model)
        self.n_params = model.num_params()  # before ZeRO-3 partitions the parameters
        if use_bf16(cfg, self.cuda):
            model = model.to(torch.bfloat16)
        universal = self.resume_plan is not None and self.resume_plan.universal
        self.ds_config = build_ds_config(cfg, self.info.world_size, self.cuda, load_universal=universal)
        if t.compile:
            # per-block compile (see CausalLM.compile_blocks): the RDT's loop stays a Python loop
            # over compiled blocks, so a new sampled T never recompiles; ZeRO's module hooks stay
            # outside the compiled regions
            model.compile_blocks()
        self.engine = build_engine(model, cfg.optim, self.ds_config)
        self.zero_stage = int(self.ds_config.get("zero_optimization", {}).get("stage", 0))
        self.base_lrs = [g["lr"] for g in self.engine.optimizer.param_groups]
        # after the identical init, each rank's global RNG gets its own stream: nothing draws from it
        # today (T and h0 come from (seed, step, position)), but a future draw (dropout) must differ
        # across data-parallel ranks, not repeat one mask on every rank; checkpoints save this state
        torch.manual_seed(t.seed + 1_000_003 * (self.info.rank + 1))

    def _build_data(self) -> None:
        """Loaders, the RDT's loop layout (which rank / micro-batch runs each sample, by loop
        count), the data fingerprint and the FLOPs accounting."""
        cfg, t = self.cfg, self.cfg.train
        self.loader = build_train_loader(
            cfg.data, t.global_batch_size, t.micro_batch_size, self.info.rank, self.info.world_size
        )
        self.layout = LoopLayout(
            cfg.model.loops, t.seed, t.global_batch_size, t.micro_batch_size, self.info.world_size,
            lockstep=self.zero_stage == 3,  # ZeRO-3: same number of core calls on every rank
            step_hops=self.loader.step_hops() if cfg.model.loops.schedule == "hops" else None,
        ) if cfg.model.kind == "rdt" else None
        self.loader.use_layout(self.layout)
        self.val_loader = build_val_loader(cfg.data, t.micro_batch_size, self.info.rank, self.info.world_size)
        self.fingerprint = self.loader.fingerprint()
        self.tokens_per_step = t.global_batch_size * self.plan["seq_len"]
        self.throughput = Throughput(cfg.model, self.plan["seq_len"], self.tokens_per_step, self.info.world_size,
                                     device_peak_flops(cfg.log.peak_tflops, self.cuda),
                                     build_model(cfg.model, device="meta"))
        self.flops_per_token = self.throughput.model_flops_per_token

    def _build_state(self) -> None:
        """The checkpointed components (state.py: the client state is exactly theirs) and the
        checkpointer that saves and loads them."""
        t, main = self.cfg.train, self.info.is_main
        self.progress = Progress()
        self.consumed = ConsumedRecord(self.run_dir, enabled=main)
        self.sample_log = SampleLog(self.run_dir, enabled=main and t.log_samples)
        self.spikes = SpikeDetector(t.spike)
        self.state = TrainState(self.progress, {"data": self.loader, "consumed": self.consumed, "spikes": self.spikes},
                                model_hash=section_hash(self.cfg.model), data_fingerprint=self.fingerprint)
        self.checkpointer = Checkpointer(self.engine, self.run_dir, t, self.state, is_main=main)

    def _components(self) -> None:
        """The per-run components, continuing from the resumed step, and the provenance files (rank 0)."""
        cfg, t, main = self.cfg, self.cfg.train, self.info.is_main
        self.logger = MetricsLogger(self.run_dir, enabled=main, tensorboard=cfg.log.tensorboard,
                                    console=cfg.log.console, resume_step=self.step, wandb=cfg.log.wandb,
                                    run_name=cfg.name, run_config=to_dict(cfg), interval=t.log_interval)
        self.periodic_eval = PeriodicEval(cfg, self.val_loader, self.device, self.logger)
        self._rewind_records()
        self.rollbacks = RollbackLog(self.run_dir, enabled=main, resuming=self.resumed_from is not None)
        if main:
            info = run_info(
                cfg, world_size=self.info.world_size, zero_stage=self.zero_stage, bf16=use_bf16(cfg, self.cuda),
                data_hash=self.plan["data_hash"], data_fingerprint=self.fingerprint, params=self.n_params,
                flops_per_token=self.flops_per_token, total_steps=self.total_steps,
                tokens_per_step=self.tokens_per_step, resumed_from=self.resumed_from,
            )
            previous = read_run_info(self.run_dir) if self.resumed_from else None
            write_run_files(self.run_dir, cfg, self.ds_config, with_segments(info, previous, self.step))
        if t.inject_inf_forward_steps and main:
            install_forward_fault(self.engine.module, t.inject_inf_forward_steps, lambda: self.step + 1)

    def _rewind_records(self) -> None:
        """The appended records continue from the current step: rows a crashed (or rolled-back)
        run wrote after it are dropped."""
        self.consumed.rewind(self.step)
        self.sample_log.rewind(self.step)

    def _maybe_resume(self) -> None:
        """Load the planned checkpoint (if any) into the engine and the components;
        ``self.resumed_from`` is its path (None when starting fresh)."""
        plan = self.resume_plan  # found (and converted for a new world size) before the process group
        self.resumed_from: str | None = None
        if plan is not None:
            # per-rank RNG files only mean something on the world size that wrote them; nothing in
            # training draws from the global RNG (RDT: T and h0 come from (seed, step, position))
            self.checkpointer.load(plan.path, universal=plan.universal,
                                   restore_rng=plan.saved_world_size == plan.world_size)
            self.resumed_from = str(plan.path)

    def rollback(self) -> None:
        """After ``train.spike.rollback_after`` flagged steps in a row: every rank (they all flag
        the same steps) reloads the newest complete, verified checkpoint from before the first of
        them, records the rollback (which batches to skip, the lr factor) and goes on in this job."""
        sp = self.cfg.train.spike
        try:
            path, event = plan_rollback(self.ckpt_root, self.spikes.streak, self.rollbacks.events, sp, self.step)
        except RollbackImpossible as exc:
            raise TrainingStopped(str(exc)) from None
        self.rollbacks.add(event)
        self.checkpointer.load(path)  # this world size wrote it (same run): its RNG files apply
        self.resumed_from = str(path)
        self.logger.rewind(self.step)
        self._rewind_records()
        self.logger.print(f"rolled back to {path} (step {event['to_step']}) after loss spikes at steps "
                          f"{event['flagged_steps']}: skipping {event['skip_batches']} global batch(es) at step "
                          f"{event['skip_from_step']}, lr x{sp.lr_factor:g} from there (rollback "
                          f"{len(self.rollbacks.events)} of at most {sp.max_rollbacks}; {ROLLBACKS})")

    # ------------------------------------------------------------------ phases
    def train_step(self, micro_batches: list[dict[str, torch.Tensor]], global_tokens: float,
                   batch_index: int = -1) -> dict[str, Any]:
        """Forward/backward every micro-batch, agree on finiteness (and on a loss spike, before the
        last backward), step. ``batch_index``: the global batch's index in the data order (fault
        injection only). Returns step stats."""
        cfg, engine = self.cfg, self.engine
        layout = self.layout
        if layout is not None:
            counts = layout.counts(self.step)  # T of every global position: f(seed, step, position)
            core_calls = 0
        scale = self.accum * self.info.world_size / max(global_tokens, 1.0)
        ce_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        bad = torch.zeros((), dtype=torch.float64, device=self.device)
        aux_acc: dict[str, torch.Tensor] = {}
        lr_mult = lr_multiplier(self.step, self.total_steps, cfg.optim)
        if self.rollbacks.events:  # a rollback's lr factor (x 1.0 would change nothing, but stay exact)
            lr_mult *= self.rollbacks.lr_factor(self.step + 1)
        set_lr(engine.optimizer, self.base_lrs, lr_mult)
        flagged = False
        for k, micro in enumerate(micro_batches):
            ids, labels = (to_device(micro[k], self.device, self.cuda) for k in ("input_ids", "labels"))
            kwargs: dict[str, Any] = {}
            if layout is not None:
                mine = counts[micro["positions"]]
                n_steps = layout.n_steps(self.step, k, mine)
                core_calls += n_steps
                kwargs = {"loop_counts": mine, "n_steps": n_steps}
                if cfg.model.h0 == "noise":  # like T, a function of (seed, step, global position)
                    kwargs["h0"] = h0_noise(cfg.model.h0_std, cfg.train.seed, self.step, micro["positions"],
                                            (ids.shape[1], cfg.model.d_model), self.device)
            out = engine(ids, labels=labels, **kwargs)
            loss = out.ce_sum * scale
            if out.aux_loss is not None:
                loss = loss + out.aux_loss
            if self.step + 1 in cfg.train.inject_nan_steps and self.info.is_main:
                loss = loss * float("nan")
            ce = out.ce_sum
            if batch_index in cfg.train.inject_spike_batches:  # every rank: the global loss spikes
                loss, ce = loss * 100.0, ce * 100.0
            bad += (~torch.isfinite(loss.detach())).double()
            ce_sum += ce.detach().double()
            if k == len(micro_batches) - 1:
                # the step's one all-reduce, before the last backward: the loss is then known on the
                # host of every rank in time to drop this update if it is a spike (no extra sync)
                agreed = dist.all_reduce_sum(torch.stack([ce_sum, bad]))
                ce_total, n_bad = agreed.tolist()
                flagged = self.spikes.check(ce_total / max(global_tokens, 1.0)) and n_bad == 0
                if flagged:  # DeepSpeed's overflow check then drops the whole update (ZeRO-0: ours)
                    loss = loss * float("nan")
            engine.backward(loss)
            for name, v in out.aux.items():
                if v.dim() == 0:
                    aux_acc[name] = aux_acc.get(name, 0) + v.detach().double() / len(micro_batches)
                elif name == "act_halt_hist":
                    aux_acc[name] = v.detach()
            skipped_before = engine.skipped_steps
            if k == len(micro_batches) - 1 and (n_bad > 0 or flagged) and self.zero_stage == 0:
                step_without_update(engine)
            else:
                engine.step()
        stats = {"loss": ce_total / max(global_tokens, 1.0), "bad": n_bad > 0, "flagged": flagged}
        stats["skipped"] = engine.skipped_steps > skipped_before or ((n_bad > 0 or flagged) and self.zero_stage == 0)
        gn = engine.get_global_grad_norm()
        if gn is not None and not stats["skipped"]:
            stats["grad_norm"] = gn  # a device tensor or float: read on log steps only
        if layout is not None:
            stats["rdt/loops_mean"] = float(counts.float().mean())
            stats["rdt/loops_max"] = float(counts.max())
            # what the hardware ran, for HFU: (forward, backward) iterations per sequence
            stats["rdt/loops_executed"], stats["rdt/bwd_loops_executed"] = executed_loops(cfg.model.loops, counts)
            stats["rdt/core_calls"] = float(core_calls)  # per rank and step (incl. zero-row lockstep calls)
        for name, v in aux_acc.items():  # device tensors: read on log steps only (no per-step sync)
            if name == "act_halt_hist":
                stats["hist/act_halt_steps"] = v
            elif name not in ("loops_mean", "loops_run", "loops_executed", "bwd_loops_executed"):
                stats[f"rdt/{name}"] = v
        return stats

    def save(self, data_state: dict[str, Any] | None = None) -> Path:
        """Checkpoint this step (:class:`Checkpointer`); ``data_state``: see its ``save``."""
        path = self.checkpointer.save(data_state)
        self.logger.print(f"saved checkpoint {path}")
        return path

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict[str, Any]:
        """Train to ``total_steps`` (or until a signal: save and return). The phases of one step
        are in the module docstring; each component decides its own cadence (``due``)."""
        start_step, t0 = self.step, time.perf_counter()
        self.bad_streak = 0  # non-finite steps in a row (train.max_bad_steps)
        self._announce()
        try:
            while self.step < self.total_steps:
                step_t0 = time.perf_counter()
                data_state, draw_state, batch_index, micro = self._draw()
                data_wait = time.perf_counter() - step_t0
                global_tokens, stop = self._agree(draw_state, micro)
                if stop:  # some rank got SIGTERM/SIGUSR1: all save this step and exit
                    self.save(data_state)
                    self.logger.print(f"stopping on signal at step {self.step}: checkpoint saved; resume: auto goes on")
                    return {"step": self.step, "stopped_on_signal": True}
                stats = self.train_step(micro, global_tokens, batch_index)
                self._account(stats, step_t0, data_wait)
                if self.logger.due(self.step, self.total_steps, force=stats["bad"] or stats["flagged"]):
                    self.log_metrics(stats, start_step, t0)
                self._stop_on_bad_streak()
                if self.spikes.rollback_due:
                    self.rollback()
                    continue
                self.periodic_eval.maybe(self.engine, self.step, last=self.step == self.total_steps)
                if self.checkpointer.due(self.step, self.total_steps):
                    self.save()
            return {"step": self.step, "stopped_on_signal": False}
        finally:
            self._close()

    def _announce(self) -> None:
        """The run's first lines: where it resumed, what it trains, an lr warmup it never leaves."""
        cfg = self.cfg
        if self.resumed_from:
            self.logger.print(f"resumed from {self.resumed_from} at step {self.step}")
        self.logger.print(
            f"{cfg.name}: {cfg.model.kind} {self.n_params / 1e6:.2f}M params | world {self.info.world_size}"
            f" | ZeRO-{self.zero_stage} | {self.total_steps} steps x {self.tokens_per_step} tokens"
            f" | data fingerprint {self.fingerprint[:16]} | run dir {self.run_dir.resolve()}"
        )
        if self.total_steps <= cfg.optim.warmup_steps:  # e.g. a README-style train.max_steps=20 smoke run
            self.logger.print(f"warning: all {self.total_steps} steps are inside the lr warmup "
                              f"(optim.warmup_steps={cfg.optim.warmup_steps}): the lr never reaches optim.lr")

    def _draw(self) -> tuple[dict[str, Any], dict[str, Any], int, list[dict[str, torch.Tensor]]]:
        """``(data_state, draw_state, batch_index, micro_batches)``: a save at this step resumes from
        ``data_state`` (a rollback's skips re-applied then); the batch was drawn at ``draw_state``."""
        data_state = self.loader.state_dict()
        if skip := self.rollbacks.skips_at(self.step + 1):  # a rollback's offending batches
            self.loader.skip(skip)
        draw_state = self.loader.state_dict() if skip else data_state
        batch_index = self.loader.batches_drawn
        return data_state, draw_state, batch_index, self.loader.next_step()

    def _account(self, stats: dict[str, Any], step_t0: float, data_wait: float) -> None:
        """Count the step just trained: counters, the spike streak, the non-finite streak, throughput."""
        t = self.cfg.train
        self.progress.advance(self.tokens_per_step, self.flops_per_token * self.tokens_per_step,
                              bad=stats["bad"], skipped=stats["skipped"])
        self.spikes.record(self.step, stats["flagged"])
        if stats["flagged"]:
            self.logger.print(f"step {self.step}: loss {stats['loss']:.4f} is a spike "
                              f"({self.spikes.last_z:.1f} sigma > train.spike.sigma={t.spike.sigma:g}): "
                              f"update skipped ({len(self.spikes.streak)} in a row)")
        self.bad_streak = self.bad_streak + 1 if stats["bad"] else 0
        executed = (stats["rdt/loops_executed"], stats["rdt/bwd_loops_executed"]) if self.layout else None
        self.throughput.add_step(time.perf_counter() - step_t0, data_wait, executed)
        if stats["bad"]:
            self.logger.print(f"step {self.step}: non-finite loss, update skipped ({self.bad_streak} in a row)")

    def _stop_on_bad_streak(self) -> None:
        """``TrainingStopped`` after ``train.max_bad_steps`` non-finite steps in a row."""
        if self.bad_streak >= (t := self.cfg.train).max_bad_steps:
            where = last[-1][1] if (last := list_tags(self.ckpt_root)) else "none yet"
            raise TrainingStopped(
                f"stopping: {self.bad_streak} consecutive steps with a non-finite loss (train.max_bad_steps="
                f"{t.max_bad_steps}); last good checkpoint: {where}; lower optim.lr or check the data"
            )

    def _close(self) -> None:
        """Every exit path: the segment's end in run_info.json (rank 0), signal handlers, logger, workers."""
        if self.info.is_main:
            try:  # bookkeeping must not mask the exception that ends the run, if any
                end_segment(self.run_dir, self.step)
            except OSError as exc:
                print(f"warning: could not record the end of this segment in run_info.json: {exc}",
                      file=sys.stderr)
        self.stop.restore()
        self.logger.close()
        self.loader.close()

    def _agree(self, data_state: dict[str, Any], micro: list[dict[str, torch.Tensor]]) -> tuple[float, bool]:
        """The step's first all-reduce: global label tokens (for the token-weighted loss), whether
        any rank was signalled, and the consumed-data checksum (checked against the data order and
        folded into the record). Returns ``(global_tokens, stop)``."""
        local_tokens = float(sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in micro))
        mine = torch.cat([b["sample_ids"] for b in micro])
        head = dist.all_reduce_sum(torch.tensor(
            [local_tokens, float(self.stop.raised), ids_checksum(mine)], dtype=torch.float64, device=self.device,
        )).tolist()
        if head[1] > 0:
            return head[0], True
        global_ids = self.loader.order.global_batch(Position(data_state["epoch"], data_state["offset"]))
        self.consumed.add(self.step + 1, head[2], ids_checksum(global_ids), len(global_ids))
        self.sample_log.add(self.step + 1, global_ids.tolist(), mine.tolist())
        return head[0], False

    def log_metrics(self, stats: dict[str, Any], start_step: int, t0: float) -> None:
        """Metrics of the window that ends at this step (reads the step's tensors: a host sync)."""
        m: dict[str, float] = {
            "train/loss": stats["loss"],
            "train/ppl": float(np.exp(min(stats["loss"], 50.0))),
            "train/lr": self.engine.optimizer.param_groups[0]["lr"],
            "train/tokens": self.progress.tokens_seen,
            "train/flops": self.progress.flops_seen,
            "train/bad_steps": self.progress.bad_steps_total,
            "train/skipped_updates": self.progress.skipped_total,
            **self.throughput.window_metrics(),
            "perf/memory_gb": memory_gb(self.cuda),
        }
        if "grad_norm" in stats:
            m["train/grad_norm"] = float(stats["grad_norm"])
        hist = {}
        if self.cfg.model.kind == "rdt":
            m["rdt/spectral_radius"] = spectral_radius(self.engine.module, self.zero_stage)
            m.update({k: float(v) for k, v in stats.items() if k.startswith("rdt/")})
            if "hist/act_halt_steps" in stats:
                h = stats["hist/act_halt_steps"].cpu()
                hist["rdt/act_halt_steps"] = torch.repeat_interleave(torch.arange(len(h)), h).float()
        if self.loader.data.is_mixture:  # realised tokens per source (exact, rank-independent)
            for name, n in self.loader.tokens_per_source().items():
                m[f"data/tokens/{name}"] = n
        if self.cfg.train.spike.action != "off":
            m.update({"train/spikes": self.spikes.flagged_total, "train/loss_z": self.spikes.last_z,
                      "train/rollbacks": len(self.rollbacks.events)})
        self.logger.log(self.step, m, histograms=hist)
        self.consumed.flush(self.step, self.progress.skipped_total, self.loader.skipped_batches)
        elapsed = time.perf_counter() - t0
        eta = elapsed / max(self.step - start_step, 1) * (self.total_steps - self.step)
        self.logger.print(format_line(self.step, self.total_steps, m, eta))
