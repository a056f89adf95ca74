"""Cross-section checks of a run config that need the world size, the shards and the DeepSpeed
file: run before any process group starts, so a bad run fails with one line (exit 2).

Kept apart from :mod:`mythos.train.config` (the dataclasses) so the config module imports
neither the data loader nor the DeepSpeed config builder, which itself reads ``RunConfig``.
"""

from __future__ import annotations

from mythos.cli_common import check_out_dir
from mythos.config import ConfigError
from mythos.data import resolve_data
from mythos.data.order import check_batch_geometry
from mythos.train.config import RunConfig
from mythos.train.ds_config import load_ds_file
from mythos.train.wandb_log import check_wandb


def check_run(cfg: RunConfig, world_size: int) -> dict:
    """Cross-checks that need the world size and the shards; returns the manifest summary.
    Raises :class:`ConfigError` with one line naming the key."""
    t = cfg.train
    check_wandb(cfg.log.wandb)  # enabled but not installed: one line now, not a crash on rank 0 later
    # a run dir that is a file or read-only fails here, not as tracebacks from every rank's first write
    check_out_dir(cfg.run_dir, "run_dir")
    check_batch_geometry(t.global_batch_size, t.micro_batch_size, world_size)
    data = resolve_data(cfg.data)  # manifests only; a mixture (data.sources) resolves its quotas here
    manifest, where = data.manifest, data.description
    if manifest.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's vocab "
            f"{manifest.vocab_size} ({where}); set model.vocab_size>={manifest.vocab_size}"
        )
    if manifest.seq_len > cfg.model.max_seq_len:
        raise ConfigError(
            f"shards hold sequences of {manifest.seq_len} tokens but model.max_seq_len={cfg.model.max_seq_len}; "
            f"raise model.max_seq_len or re-shard with a shorter --seq-len"
        )
    if cfg.model.kind == "rdt" and cfg.model.loops.schedule == "hops" and (
            data.is_mixture or manifest.sample_hops("train") is None):
        raise ConfigError(
            f"model.loops.schedule=hops needs each sample's hop count, but {where} "
            f"{'is a mixture' if data.is_mixture else 'records none (no sample_hops in its manifest)'}; "
            f"train on a task built by python -m mythos.tasks, or use another schedule"
        )
    train_samples = data.num_train_samples
    steps_per_epoch = train_samples // t.global_batch_size
    tokens_per_step = t.global_batch_size * manifest.seq_len
    steps = t.max_steps or -(-t.max_tokens // tokens_per_step)
    if steps_per_epoch == 0:
        raise ConfigError(
            f"{where} has {train_samples} training samples, fewer than one global batch "
            f"({t.global_batch_size}); lower train.global_batch_size or add data"
        )
    if steps > steps_per_epoch * t.max_epochs:
        raise ConfigError(
            f"the data runs out: {steps} steps x {tokens_per_step} tokens need "
            f"{steps / steps_per_epoch:.2f} epochs of {where} ({steps_per_epoch} steps each) "
            f"but train.max_epochs={t.max_epochs}; add data, lower the budget or raise train.max_epochs"
        )
    if cfg.optim.name == "muon" and _peek_zero_stage(cfg) == 0:
        raise ConfigError(
            "optim.name=muon needs ZeRO stage >= 1 (DeepSpeed runs Muon's Newton-Schulz step inside its ZeRO "
            f"optimizer; stage 0 would silently train with SGD); use a zero1/2/3 deepspeed.config, not "
            f"{cfg.deepspeed.config}"
        )
    return {"steps": steps, "steps_per_epoch": steps_per_epoch, "seq_len": manifest.seq_len,
            "train_samples": train_samples, "data_hash": data.data_hash, "vocab_size": manifest.vocab_size}


def _peek_zero_stage(cfg: RunConfig) -> int:
    return int(load_ds_file(cfg.deepspeed.config).get("zero_optimization", {}).get("stage", 0))
