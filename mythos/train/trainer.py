"""The training loop: ``Trainer(cfg).fit()`` with named phases.

One optimizer step::

    stop?   all-reduce [local label tokens, signal flag]   -> token-weighted scale, agreed stop
    micro   forward/backward x accum (RDT: loop counts of the *global* batch from (seed, step))
    guard   all-reduce [ce sum, non-finite flag]           -> exact step loss; skip bad updates
    step    engine.step() (lr set from the step first), then log / eval / save as due

Two scalar all-reduces per step are the only host syncs besides logging.
"""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import mythos
from mythos import dist
from mythos.config import ConfigError, dump_yaml, to_dict
from mythos.data import IGNORE_INDEX, build_train_loader, build_val_loader
from mythos.model import build_model
from mythos.model.loops import executed_loops
from mythos.train import checkpoint as ckpt
from mythos.train import reshard
from mythos.train.checks import check_run
from mythos.train.config import RunConfig
from mythos.train.ds_config import build_ds_config, use_bf16, write_ds_config
from mythos.train.evaluate import TokenBytes, evaluate
from mythos.train.loop_layout import LoopLayout, h0_noise
from mythos.train.metrics import MetricsLogger, format_line
from mythos.train.optim import lr_multiplier, muon_eligible, param_groups, set_lr
from mythos.train.signals import StopFlag


class TrainingStopped(RuntimeError):
    """Raised when the run must stop (too many bad steps); the message says what to do."""


def _section_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(to_dict(obj), sort_keys=True).encode()).hexdigest()[:16]


def _git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        ).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Trainer:
    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        # installed first, so a preemption warning that arrives during start-up (process group,
        # model build, resume) is not lost: the first step boundary acts on it
        self.stop = StopFlag()
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        info = dist.env_info()
        # everything that can be checked without a process group is checked first; a checkpoint
        # from another world size is checked (own message) and converted here too (see reshard)
        self.resume_plan = reshard.plan_resume(self.ckpt_root, cfg.train.resume, info.world_size,
                                               cfg.train.global_batch_size, cfg.train.micro_batch_size)
        self.plan = check_run(cfg, info.world_size)
        reshard.ensure_universal(self.resume_plan, info.rank, cfg.train.dist_timeout_s)
        self.info = dist.init_distributed(cfg.train.dist_timeout_s)
        self.device = dist.device()
        self.cuda = dist.is_cuda()
        self.total_steps = self.plan["steps"]
        t = cfg.train
        self.accum = t.global_batch_size // (t.micro_batch_size * self.info.world_size)

        torch.manual_seed(t.seed)  # identical init on every rank
        self.model = build_model(cfg.model)
        self.n_params = self.model.num_params()  # before ZeRO-3 partitions the parameters
        if use_bf16(cfg, self.cuda):
            self.model = self.model.to(torch.bfloat16)
        universal = self.resume_plan is not None and self.resume_plan.universal
        self.ds_config = build_ds_config(cfg, self.info.world_size, self.cuda, load_universal=universal)
        if t.compile:
            # per-block compile (see CausalLM.compile_blocks): the RDT's loop stays a Python loop
            # over compiled blocks, so a new sampled T never recompiles; ZeRO's module hooks stay
            # outside the compiled regions
            self.model.compile_blocks()
        self.engine = self._initialize()
        self.zero_stage = int(self.ds_config.get("zero_optimization", {}).get("stage", 0))
        self.base_lrs = [g["lr"] for g in self.engine.optimizer.param_groups]
        torch.manual_seed(t.seed + 1_000_003 * (self.info.rank + 1))  # per-rank stream (h0 noise)

        # RDT: which rank / micro-batch runs each sample, by loop count (ZeRO-3 keeps ranks in step)
        self.layout = LoopLayout(
            cfg.model.loops, t.seed, t.global_batch_size, t.micro_batch_size, self.info.world_size,
            lockstep=self.zero_stage == 3,
        ) if cfg.model.kind == "rdt" else None
        self.loader = build_train_loader(
            cfg.data, t.global_batch_size, t.micro_batch_size, self.info.rank, self.info.world_size, self.layout
        )
        self.val_loader = build_val_loader(cfg.data, t.micro_batch_size, self.info.rank, self.info.world_size)
        self.fingerprint = self.loader.fingerprint()
        self._meta_model = build_model(cfg.model, device="meta")  # for FLOPs accounting only
        self._hw_flops_cache: dict[float | None, float] = {}
        self.flops_per_token = self._flops_per_token()
        self.peak_flops = self._peak_flops()

        self.step = 0
        self.tokens_seen = 0
        self.flops_seen = 0.0
        self.bad_steps_total = 0
        self.skipped_total = 0
        self.resumed_from = self._maybe_resume()
        self.logger = MetricsLogger(
            self.run_dir, enabled=self.info.is_main, tensorboard=cfg.log.tensorboard, console=cfg.log.console,
            resume_step=self.step,
        )
        self._write_run_files()
        self._install_forward_fault()

    # ------------------------------------------------------------------ setup
    def _initialize(self) -> Any:
        import deepspeed

        groups = param_groups(self.model, self.cfg.optim)
        if self.cfg.optim.name != "muon":
            engine, *_ = deepspeed.initialize(model=self.model, model_parameters=groups, config=self.ds_config)
            return engine
        # DeepSpeed tags use_muon by parameter *name* (2-D and not "embed"/"lm_head"), which would
        # put the LTI injection B and readout C, and the 3-D LoRA banks, on Muon. Parcae keeps them
        # on AdamW, so re-tag right after DeepSpeed's pass, before it builds the optimizer.
        eligible = muon_eligible(self.model)
        original = deepspeed.set_optimizer_flags

        def retag(config_class: Any, model: torch.nn.Module) -> None:
            original(config_class, model)
            for name, p in model.named_parameters():
                p.use_muon = eligible.get(name, False)

        deepspeed.set_optimizer_flags = retag
        try:
            engine, *_ = deepspeed.initialize(model=self.model, model_parameters=groups, config=self.ds_config)
        finally:
            deepspeed.set_optimizer_flags = original
        return engine

    def _flops_per_token(self) -> float:
        """Model FLOPs per token (MFU): the RDT at its *expected* loop count E[T], E[k]."""
        from mythos.accounting import flops_per_token

        return float(flops_per_token(self.cfg.model, self.plan["seq_len"], model=self._meta_model).total)

    def _hardware_flops_per_token(self, executed: tuple[float, float] | None) -> float:
        """FLOPs the hardware ran per token (HFU): the RDT's executed (forward, backward) core
        iterations per sequence (see ``loop_layout.executed_loops``) plus the forwards activation
        checkpointing recomputes. Cached per loop count."""
        from mythos.accounting import flops_per_token

        key = None if executed is None else (round(executed[0], 3), round(executed[1], 3))
        if key not in self._hw_flops_cache:
            ckpt_on = self.cfg.model.checkpoint_layers or self.cfg.model.checkpoint_loops
            self._hw_flops_cache[key] = float(flops_per_token(
                self.cfg.model, self.plan["seq_len"], loops_mean=None if key is None else key[0],
                bwd_loops_mean=None if key is None else key[1], include_recompute=ckpt_on, model=self._meta_model,
            ).total)
        return self._hw_flops_cache[key]

    def _peak_flops(self) -> float | None:
        if self.cfg.log.peak_tflops:
            return self.cfg.log.peak_tflops * 1e12
        if not self.cuda:
            return None
        from mythos.accounting import peak_flops_for_device

        return peak_flops_for_device(torch.cuda.get_device_name())

    def _maybe_resume(self) -> str | None:
        plan = self.resume_plan  # found (and converted for a new world size) before the process group
        if plan is None:
            return None
        path = plan.path
        # per-rank RNG files only mean something on the world size that wrote them; nothing in
        # training draws from the global RNG (RDT: T and h0 come from (seed, step, position))
        client = ckpt.load(self.engine, path, universal=plan.universal,
                           restore_rng=plan.saved_world_size == plan.world_size)
        for key, now in (("model_hash", _section_hash(self.cfg.model)), ("data_fingerprint", self.fingerprint)):
            if client.get(key) != now:
                raise ConfigError(
                    f"checkpoint {path} was written with a different {key.replace('_', ' ')} "
                    f"({client.get(key)} vs {now}); resume with the original config, or use a new run_dir"
                )
        self.loader.load_state_dict(client["data"])
        self.step = int(client["step"])
        self.tokens_seen = int(client["tokens_seen"])
        self.flops_seen = float(client["flops_seen"])
        self.bad_steps_total = int(client.get("bad_steps_total", 0))
        self.skipped_total = int(client.get("skipped_total", 0))
        return str(path)

    def _write_run_files(self) -> None:
        if not self.info.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.atomic_write_text(self.run_dir / "config.resolved.yaml", dump_yaml(self.cfg))
        write_ds_config(self.ds_config, self.run_dir / "ds_config.json")
        run_info = {
            "name": self.cfg.name,
            "kind": self.cfg.model.kind,
            "git_commit": _git_commit(),
            "mythos_version": mythos.__version__,
            "torch": torch.__version__,
            "deepspeed": __import__("deepspeed").__version__,
            "python": platform.python_version(),
            "host": platform.node(),
            "world_size": self.info.world_size,
            "zero_stage": self.zero_stage,
            "bf16": use_bf16(self.cfg, self.cuda),
            "data_hash": self.plan["data_hash"],
            "data_fingerprint": self.fingerprint,
            "model_hash": _section_hash(self.cfg.model),
            "params": self.n_params,
            "flops_per_token": self.flops_per_token,
            "total_steps": self.total_steps,
            "tokens_per_step": self.cfg.train.global_batch_size * self.plan["seq_len"],
            "resumed_from": self.resumed_from,
            "start_time": time.time(),
        }
        ckpt.atomic_write_text(self.run_dir / "run_info.json", json.dumps(run_info, indent=2) + "\n")

    def _install_forward_fault(self) -> None:
        """Test-only (``train.inject_inf_forward_steps``): at these steps rank 0's
        first transformer block (the RDT's first core block, inside the loop) emits an inf
        activation in training, so the NaN guard is exercised by a non-finite value that arises
        inside the forward, as an overflow would, not by a poisoned loss."""
        t = self.cfg.train
        if not t.inject_inf_forward_steps or not self.info.is_main:
            return
        from mythos.model.layers import Block

        module = self.engine.module
        block = module.core[0] if hasattr(module, "core") else next(m for m in module.modules() if isinstance(m, Block))

        def hook(mod: torch.nn.Module, args: Any, output: tuple[torch.Tensor, Any]) -> Any:
            x, aux = output
            if not (mod.training and self.step + 1 in t.inject_inf_forward_steps and x.numel()):
                return None
            x = x.clone()
            x.view(-1)[0] = float("inf")
            return x, aux

        block.register_forward_hook(hook)

    def _log_samples(self, data_state: dict[str, Any], micro: list[dict[str, torch.Tensor]]) -> None:
        """``train.log_samples``: rank 0 appends the step's global sample ids to
        ``RUN_DIR/samples.jsonl`` -- from the loader's world-size-independent order at the step's
        start position (no communication), plus the ids rank 0 really received. Lines past the
        resumed step are dropped first, as metrics.jsonl does."""
        if not (self.cfg.train.log_samples and self.info.is_main):
            return
        from mythos.data.order import Position

        path = self.run_dir / "samples.jsonl"
        if not getattr(self, "_samples_log_trimmed", False):
            keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= self.step] \
                if path.exists() else []
            ckpt.atomic_write_text(path, "".join(ln + "\n" for ln in keep))
            self._samples_log_trimmed = True
        ids = self.loader.order.global_batch(Position(data_state["epoch"], data_state["offset"]))
        mine = torch.cat([b["sample_ids"] for b in micro]).tolist()
        rec = {"step": self.step + 1, "ids": sorted(int(i) for i in ids), "rank0": sorted(mine)}
        with path.open("a") as f:
            f.write(json.dumps(rec) + "\n")

    # ------------------------------------------------------------------ phases
    def train_step(self, micro_batches: list[dict[str, torch.Tensor]], global_tokens: float) -> dict[str, Any]:
        """Forward/backward every micro-batch, agree on finiteness, step. Returns step stats."""
        cfg, engine = self.cfg, self.engine
        layout = self.layout
        if layout is not None:
            counts = layout.counts(self.step)  # T of every global position: f(seed, step, position)
            core_calls = 0
        scale = self.accum * self.info.world_size / max(global_tokens, 1.0)
        ce_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        bad = torch.zeros((), dtype=torch.float64, device=self.device)
        aux_acc: dict[str, torch.Tensor] = {}
        set_lr(engine.optimizer, self.base_lrs, lr_multiplier(self.step, self.total_steps, cfg.optim))
        for k, micro in enumerate(micro_batches):
            ids = micro["input_ids"].to(self.device, non_blocking=True)
            labels = micro["labels"].to(self.device, non_blocking=True)
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
            bad += (~torch.isfinite(loss.detach())).double()
            engine.backward(loss)
            ce_sum += out.ce_sum.detach().double()
            for name, v in out.aux.items():
                if v.dim() == 0:
                    aux_acc[name] = aux_acc.get(name, 0) + v.detach().double() / len(micro_batches)
                elif name == "act_halt_hist":
                    aux_acc[name] = v.detach()
            if k == len(micro_batches) - 1:
                agreed = dist.all_reduce_sum(torch.stack([ce_sum, bad]))
                ce_total, n_bad = agreed.tolist()
                if n_bad > 0 and self.zero_stage == 0:
                    for p in engine.module.parameters():  # no ZeRO optimizer to skip it for us
                        p.grad = None
            skipped_before = engine.skipped_steps
            engine.step()
        stats = {"loss": ce_total / max(global_tokens, 1.0), "bad": n_bad > 0}
        stats["skipped"] = engine.skipped_steps > skipped_before or (n_bad > 0 and self.zero_stage == 0)
        gn = engine.get_global_grad_norm()
        if gn is not None and not stats["skipped"]:
            stats["grad_norm"] = float(gn)
        if layout is not None:
            stats["rdt/loops_mean"] = float(counts.float().mean())
            stats["rdt/loops_max"] = float(counts.max())
            # what the hardware ran, for HFU: (forward, backward) iterations per sequence
            stats["rdt/loops_executed"], stats["rdt/bwd_loops_executed"] = executed_loops(cfg.model.loops, counts)
            stats["rdt/core_calls"] = float(core_calls)  # per rank and step (incl. zero-row lockstep calls)
        for name, v in aux_acc.items():
            if name == "act_halt_hist":
                stats["hist/act_halt_steps"] = v.cpu()
            elif name not in ("loops_mean", "loops_run", "loops_executed"):
                stats[f"rdt/{name}"] = float(v)
        return stats

    def maybe_eval(self, force: bool = False) -> dict[str, float]:
        t = self.cfg.train
        due = t.eval_interval and self.step % t.eval_interval == 0
        if not (due or force):
            return {}
        if not hasattr(self, "_token_bytes"):  # bits per byte need the tokenizer; None when it is not found
            self._token_bytes = TokenBytes.for_shards(self.cfg.data.shards)
        self.engine.eval()
        try:
            res = evaluate(
                self.engine, lambda: iter(self.val_loader), self.cfg.model, self.device,
                loops=t.eval_loops, max_batches=t.eval_batches, token_bytes=self._token_bytes,
            )
        finally:
            self.engine.train()
        self.logger.log(self.step, res)
        self.logger.print(
            f"eval step {self.step}: " + " | ".join(f"{k.removeprefix('val/')} {v:.4f}" for k, v in res.items()
                                                     if k.startswith("val/loss"))
        )
        return res

    def save(self, data_state: dict[str, Any] | None = None) -> Path:
        client = {
            "step": self.step,
            "data": data_state or self.loader.state_dict(),
            "tokens_seen": self.tokens_seen,
            "flops_seen": self.flops_seen,
            "bad_steps_total": self.bad_steps_total,
            "skipped_total": self.skipped_total,
            "data_fingerprint": self.fingerprint,
            "model_hash": _section_hash(self.cfg.model),
        }
        path = ckpt.save(self.engine, self.ckpt_root, self.step, client, self.cfg.train.keep_last)
        self.logger.print(f"saved checkpoint {path}")
        return path

    @torch.no_grad()
    def _spectral_radius(self) -> float:
        module = self.engine.module
        if self.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(module.injection.parameters())):
                return float(module.spectral_radius())
        return float(module.spectral_radius())

    def _memory_gb(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**30
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict[str, Any]:
        cfg, t = self.cfg, self.cfg.train
        stop = self.stop
        tokens_per_step = t.global_batch_size * self.plan["seq_len"]
        start_step, t0 = self.step, time.perf_counter()
        window: list[float] = []
        data_wait: list[float] = []
        loops_run: list[tuple[float, float]] = []
        consecutive_bad = 0
        if self.resumed_from:
            self.logger.print(f"resumed from {self.resumed_from} at step {self.step}")
        self.logger.print(
            f"{cfg.name}: {cfg.model.kind} {self.n_params / 1e6:.2f}M params | world {self.info.world_size}"
            f" | ZeRO-{self.zero_stage} | {self.total_steps} steps x {tokens_per_step} tokens"
            f" | data fingerprint {self.fingerprint[:16]} | run dir {self.run_dir}"
        )
        try:
            while self.step < self.total_steps:
                step_t0 = time.perf_counter()
                data_state = self.loader.state_dict()
                micro = self.loader.next_step()
                self._log_samples(data_state, micro)  # train.log_samples: audit/test record
                data_wait.append(time.perf_counter() - step_t0)
                local_tokens = float(sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in micro))
                head = dist.all_reduce_sum(
                    torch.tensor([local_tokens, float(stop.raised)], dtype=torch.float64, device=self.device)
                ).tolist()
                if head[1] > 0:  # some rank got SIGTERM/SIGUSR1: all save this step and exit
                    self.save(data_state)
                    self.logger.print(f"stopping on signal at step {self.step}: checkpoint saved; resume: auto goes on")
                    return {"step": self.step, "stopped_on_signal": True}
                stats = self.train_step(micro, head[0])
                self.step += 1
                self.skipped_total += int(stats["skipped"])
                consecutive_bad = consecutive_bad + 1 if stats["bad"] else 0
                self.bad_steps_total += int(stats["bad"])
                self.tokens_seen += tokens_per_step
                self.flops_seen += self.flops_per_token * tokens_per_step
                window.append(time.perf_counter() - step_t0)
                if "rdt/loops_executed" in stats:
                    loops_run.append((stats["rdt/loops_executed"], stats["rdt/bwd_loops_executed"]))
                if stats["bad"]:
                    self.logger.print(f"step {self.step}: non-finite loss, update skipped ({consecutive_bad} in a row)")
                if self.step % t.log_interval == 0 or self.step == self.total_steps or stats["bad"]:
                    self.log_metrics(stats, window, data_wait, loops_run, start_step, t0)
                    window, data_wait, loops_run = [], [], []
                if consecutive_bad >= t.max_bad_steps:
                    last = ckpt.list_tags(self.ckpt_root)
                    where = last[-1][1] if last else "none yet"
                    raise TrainingStopped(
                        f"stopping: {consecutive_bad} consecutive steps with a non-finite loss (train.max_bad_steps="
                        f"{t.max_bad_steps}); last good checkpoint: {where}; lower optim.lr or check the data"
                    )
                self.maybe_eval(force=self.step == self.total_steps)
                if (t.save_interval and self.step % t.save_interval == 0) or self.step == self.total_steps:
                    self.save()
            return {"step": self.step, "stopped_on_signal": False}
        finally:
            stop.restore()
            self.logger.close()
            self.loader.close()

    def log_metrics(self, stats: dict[str, Any], window: list[float], data_wait: list[float],
                    loops_run: list[tuple[float, float]], start_step: int, t0: float) -> None:
        tokens_per_step = self.cfg.train.global_batch_size * self.plan["seq_len"]
        step_time = float(np.mean(window))
        tok_s = tokens_per_step / step_time
        m: dict[str, float] = {
            "train/loss": stats["loss"],
            "train/ppl": float(np.exp(min(stats["loss"], 50.0))),
            "train/lr": self.engine.optimizer.param_groups[0]["lr"],
            "train/tokens": self.tokens_seen,
            "train/flops": self.flops_seen,
            "train/bad_steps": self.bad_steps_total,
            "train/skipped_updates": self.skipped_total,
            "perf/step_time_s": step_time,
            "perf/data_wait_frac": float(np.sum(data_wait) / max(np.sum(window), 1e-9)),
            "perf/tokens_per_s": tok_s,
            "perf/tokens_per_s_per_device": tok_s / self.info.world_size,
            "perf/memory_gb": self._memory_gb(),
        }
        if "grad_norm" in stats:
            m["train/grad_norm"] = stats["grad_norm"]
        executed = tuple(np.mean(loops_run, axis=0).tolist()) if loops_run else None
        hw_flops = self._hardware_flops_per_token(executed)  # type: ignore[arg-type]
        m["perf/model_tflops_per_device"] = self.flops_per_token * tok_s / self.info.world_size / 1e12
        m["perf/hardware_tflops_per_device"] = hw_flops * tok_s / self.info.world_size / 1e12
        if self.peak_flops:  # MFU counts model FLOPs; HFU what ran (max-T loops, recompute)
            m["perf/mfu"] = self.flops_per_token * tok_s / (self.peak_flops * self.info.world_size)
            m["perf/hfu"] = hw_flops * tok_s / (self.peak_flops * self.info.world_size)
        hist = {}
        if self.cfg.model.kind == "rdt":
            m["rdt/spectral_radius"] = self._spectral_radius()
            for k, v in stats.items():
                if k.startswith("rdt/"):
                    m[k] = v
            if "hist/act_halt_steps" in stats:
                h = stats["hist/act_halt_steps"]
                hist["rdt/act_halt_steps"] = torch.repeat_interleave(torch.arange(len(h)), h).float()
        if self.loader.data.is_mixture:  # realised tokens per source (exact, rank-independent)
            for name, n in self.loader.tokens_per_source().items():
                m[f"data/tokens/{name}"] = n
        self.logger.log(self.step, m, histograms=hist)
        elapsed = time.perf_counter() - t0
        eta = elapsed / max(self.step - start_step, 1) * (self.total_steps - self.step)
        self.logger.print(format_line(self.step, self.total_steps, m, eta))
