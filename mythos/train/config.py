"""The run config: everything one ``launch/pretrain.py`` invocation needs, as typed sections.

``configs/run/*.yaml`` include a model preset and a shared data file, so the two arms of a
comparison differ only where their files say so. Loaded strictly (see :mod:`mythos.config`);
:func:`mythos.train.checks.check_run` adds the cross-section checks that need the world size and
the shards, and runs before any process group starts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mythos.config import load_config
from mythos.data.config import DataConfig
from mythos.model.config import ModelConfig


@dataclass(kw_only=True)
class OptimConfig:
    name: Literal["adamw", "muon"] = "adamw"
    """``adamw`` for every parameter, or Parcae's split: ``muon`` on 2-D weight matrices and
    AdamW (no weight decay) on embeddings, norms and the LTI parameters."""
    lr: float = 3e-4
    """Peak AdamW learning rate (with ``muon``: the AdamW half's)."""
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    """Decoupled weight decay of matrices; embeddings, vectors and LTI parameters get none."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 = off)."""
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    """``cosine``: linear warmup then cosine to ``min_lr_ratio``; ``wsd``: warmup-stable-decay
    (Parcae's trapezoid), linear decay over the last ``decay_fraction`` of steps."""
    warmup_steps: int = 100
    decay_fraction: float = 0.2
    min_lr_ratio: float = 0.1
    impl: Literal["auto", "torch", "fused"] = "auto"
    """AdamW kernel: ``torch`` (torch.optim.AdamW; no JIT build), ``fused`` (DeepSpeed's
    FusedAdam / CPUAdam); ``auto`` = fused on GPU, torch on CPU."""

    def validate(self) -> None:
        if self.lr <= 0 or self.muon_lr <= 0:
            raise ValueError("learning rates must be > 0")
        if not 0 <= self.decay_fraction <= 1 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("decay_fraction and min_lr_ratio must be in [0, 1]")


@dataclass(kw_only=True)
class SpikeConfig:
    """Loss-spike handling (:mod:`mythos.train.spikes`). A step is *flagged* when its loss exceeds
    the mean of the last ``window`` unflagged steps by more than ``sigma`` standard deviations."""

    action: Literal["off", "skip", "rollback"] = "off"
    """``off``: detect nothing (today's behaviour, bit for bit). ``skip``: a flagged step's
    update is skipped (its batch counts as consumed, not learned). ``rollback``: skip too, and
    after ``rollback_after`` flagged steps in a row every rank reloads the newest good checkpoint
    before the first of them and goes on."""
    window: int = 50
    sigma: float = 6.0
    min_history: int = 20
    """Unflagged steps needed before anything is flagged (the first steps' losses move fast)."""
    rollback_after: int = 3
    max_rollbacks: int = 3
    """More rollbacks than this in one run stop it (one line naming the checkpoint and steps)."""
    lr_factor: float = 1.0
    """After a rollback, the learning rate is multiplied by this from the first flagged step on."""
    skip_batches: bool = True
    """After a rollback, skip the global batches of the flagged steps (recorded: compare reports
    that the run no longer saw the same data as its pair)."""

    def validate(self) -> None:
        if self.window < 2 or not 1 <= self.min_history <= self.window:
            raise ValueError(f"spike.window must be >= 2 and 1 <= spike.min_history <= spike.window, got "
                             f"window={self.window}, min_history={self.min_history}")
        if self.sigma <= 0 or self.rollback_after < 1 or self.max_rollbacks < 0:
            raise ValueError("spike.sigma must be > 0, spike.rollback_after >= 1, spike.max_rollbacks >= 0")
        if not 0 < self.lr_factor <= 1:
            raise ValueError(f"spike.lr_factor must be in (0, 1], got {self.lr_factor}")


@dataclass(kw_only=True)
class TrainConfig:
    global_batch_size: int = 32
    """Samples (sequences) per optimizer step, across all ranks: ``micro * accum * world``."""
    micro_batch_size: int = 4
    """Samples per rank per forward/backward."""
    max_steps: int = 0
    """Optimizer steps. 0 = derive from ``max_tokens``."""
    max_tokens: int = 0
    """Token budget (the planner sets this); steps = ceil(tokens / (batch * seq_len))."""
    max_epochs: int = 1
    """How often the data may be repeated before the run refuses to start ("data runs out")."""
    seed: int = 1234
    """Seeds model init, per-rank RNG streams and the RDT loop counts (data order has its own)."""
    log_interval: int = 10
    eval_interval: int = 0
    """Steps between validation passes (0 = only at the end)."""
    eval_batches: int = 0
    """Validation batches per rank per pass; 0 = the whole val split, the only setting whose
    result is independent of the world size (use it for comparisons)."""
    eval_loops: list[int] = field(default_factory=lambda: [1, 4, 8])
    """RDT: also evaluate at these loop counts (the training mean is always evaluated)."""
    save_interval: int = 0
    """Steps between checkpoints (0 = only at the end and on signals)."""
    keep_last: int = 3
    """Complete checkpoints to keep (older ones are deleted after a newer one completes)."""
    resume: str = "auto"
    """``auto`` = newest complete checkpoint in the run dir if any; ``none``; or a checkpoint path."""
    max_bad_steps: int = 5
    """Stop after this many consecutive steps with a non-finite loss (updates are skipped)."""
    spike: SpikeConfig = field(default_factory=SpikeConfig)
    inject_nan_steps: list[int] = field(default_factory=list)
    """Fault injection for tests: rank 0's loss becomes NaN at these steps (1-based, as logged)."""
    inject_spike_batches: list[int] = field(default_factory=list)
    """Fault injection for tests: every rank's loss is multiplied by 100 on these global batches
    (0-based index into the data order, skipped batches included: a rolled-back run that skips
    them does not meet the fault again)."""
    inject_inf_forward_steps: list[int] = field(default_factory=list)
    """Fault injection for tests: at these steps a forward hook makes rank 0's first transformer
    block (the RDT's first core block) emit an inf activation inside the forward."""
    log_samples: bool = False
    """Audit/tests: rank 0 appends each step's global sample ids to ``RUN_DIR/samples.jsonl``."""
    dist_timeout_s: float = 900.0
    """Collective timeout: a hung rank becomes an error after this long."""
    compile: bool = False
    """``torch.compile`` every transformer block (worth it on GPU; on CPU compiling takes
    20-60 s per model)."""

    def validate(self) -> None:
        if self.global_batch_size < 1 or self.micro_batch_size < 1:
            raise ValueError("global_batch_size and micro_batch_size must be >= 1")
        if self.max_steps < 0 or self.max_tokens < 0:
            raise ValueError("max_steps and max_tokens must be >= 0")
        if self.max_steps == 0 and self.max_tokens == 0:
            raise ValueError("set train.max_steps or train.max_tokens")
        if self.log_interval < 1:
            raise ValueError("log_interval must be >= 1")


@dataclass(kw_only=True)
class DeepSpeedSection:
    config: str = "configs/deepspeed/zero2.yaml"
    """DeepSpeed's own settings (``zero_optimization``, offload, ...). Batch sizes, precision,
    clipping and the optimizer come from this run config and must not be set there."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """``auto`` = bf16 on GPU, fp32 on CPU."""


@dataclass(kw_only=True)
class WandbConfig:
    """Optional Weights & Biases logging (rank 0; the same scalars as TensorBoard). Needs
    ``pip install wandb`` only when ``mode`` is not ``disabled``."""

    mode: Literal["disabled", "online", "offline"] = "disabled"
    """``offline`` writes ``RUN_DIR/wandb/offline-run-*`` (upload later with ``wandb sync``)."""
    project: str = "mythos"
    entity: str = ""
    """Team or user; empty = wandb's default entity."""
    tags: list[str] = field(default_factory=list)


@dataclass(kw_only=True)
class LogConfig:
    tensorboard: bool = True
    peak_tflops: float = 0.0
    """Peak dense TFLOP/s per device for MFU; 0 = look up the device name (unknown -> no MFU)."""
    console: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass(kw_only=True)
class RunConfig:
    name: str = "run"
    run_dir: str = "runs/run"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    log: LogConfig = field(default_factory=LogConfig)


def load_run_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    return load_config(RunConfig, path, overrides, kind="run")
