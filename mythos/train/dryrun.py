"""``python -m mythos.train --config X --dry-run``: everything a launch would resolve and check,
without starting a process group, a DeepSpeed engine or a model.

Prints the resolved run config, the derived DeepSpeed config, the plan (steps, tokens, model and
hardware FLOPs per token and in total, GPU-hours at ``--mfu`` of ``--peak-tflops``) and one verdict
per check. Exit 0 when every check passes; otherwise exit 2 and the first failing check's line on
stderr, as the real launch would fail (the same functions run: :func:`~mythos.train.checks.check_run`,
:func:`~mythos.train.reshard.plan_resume`, the loader's shard verification).

Nothing is written or moved: a corrupt newer checkpoint that a real start would move aside
(``TAG.corrupt-*``) is only reported. The DeepSpeed config is derived for GPUs unless
``DS_ACCELERATOR=cpu`` (a dry run usually runs on a login node planning a GPU job).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from mythos.config import ConfigError, dump_yaml
from mythos.run_dir import checkpoints, read_marker
from mythos.train.config import RunConfig, WandbConfig, load_run_config

#: Defaults of the plan's hardware assumptions (H100 SXM dense bf16; a typical large-run MFU).
DEFAULT_GPUS = 8
DEFAULT_PEAK_TFLOPS = 989.5


@dataclasses.dataclass
class Verdict:
    name: str
    ok: bool | None  # None: skipped (an earlier check it needs failed)
    detail: str


def _si(x: float) -> str:
    for unit, scale in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


@contextlib.contextmanager
def _no_quarantine() -> Iterator[None]:
    """Make :func:`~mythos.train.reshard.choose_checkpoint` report a corrupt tag without moving it."""
    from mythos.train import checkpoint as ckpt

    def keep(path: os.PathLike) -> None:
        raise OSError(f"dry run: {path} left in place")

    saved = ckpt.quarantine
    ckpt.quarantine = keep  # choose_checkpoint treats OSError as "already moved" and only reports
    try:
        yield
    finally:
        ckpt.quarantine = saved


def _run(name: str, fn: Callable[[], str], verdicts: list[Verdict]) -> bool:
    try:
        verdicts.append(Verdict(name, True, fn()))
        return True
    except ConfigError as exc:
        verdicts.append(Verdict(name, False, str(exc)))
    except Exception as exc:  # a dry run reports every failure as a verdict, never a traceback
        verdicts.append(Verdict(name, False, f"{type(exc).__name__}: {exc}"))
    return False


def _skip(name: str, why: str, verdicts: list[Verdict]) -> None:
    verdicts.append(Verdict(name, None, f"skipped ({why})"))


def check_data(cfg: RunConfig) -> str:
    """Manifests resolve and every shard matches its manifest entry (``data.verify``: size, sha256)."""
    from mythos.data import resolve_data
    from mythos.data.dataset import verify_shard

    data = resolve_data(cfg.data)
    n = 0
    for m in data.manifests:
        for split in ("train", "val"):
            for info in m.split_shards(split):
                verify_shard(m.directory / info.name, info, cfg.data.verify)
                n += 1
    how = {"full": "sizes + sha256", "size": "sizes", "none": "not verified (data.verify=none)"}[cfg.data.verify]
    val = sum(m.num_samples("val") for m in data.manifests)
    return (f"{data.description}: {data.num_train_samples} train / {val} val samples in {n} shards, "
            f"seq_len {data.manifest.seq_len}, vocab {data.manifest.vocab_size}; {how} ok")


def check_resume(cfg: RunConfig, world: int, data_ok: bool = True) -> str:
    """The resume point a start on ``world`` ranks would take (fresh / resume / convert), and the
    launch's identity check of it: the same model, and (``data_ok``: the shards checked out) the
    same data fingerprint."""

    from mythos.train import reshard

    t = cfg.train
    root = checkpoints(cfg.run_dir)
    with _no_quarantine():
        rp = reshard.plan_resume(root, t.resume, world, t.global_batch_size, t.micro_batch_size)
    if rp is None:
        return f"fresh start (no checkpoint under {root})" if t.resume != "none" else "fresh start (train.resume=none)"
    # the identity the launch checks after loading it (same function), from the COMPLETE marker
    from mythos.data import build_train_loader
    from mythos.train import checkpoint as ckpt
    from mythos.train.provenance import section_hash

    fingerprint = None
    if data_ok:  # the data check verified the shards already: no second sha256 pass
        loader = build_train_loader(dataclasses.replace(cfg.data, verify="none"), t.global_batch_size,
                                    t.micro_batch_size, 0, world)
        try:
            fingerprint = loader.fingerprint()
        finally:
            loader.close()
    ckpt.check_identity(read_marker(rp.path) or {}, rp.path, model_hash=section_hash(cfg.model),
                        data_fingerprint=fingerprint, require=False)
    same = "same model and data" if fingerprint else "same model (data unchecked: see the data check)"
    if rp.universal:
        return (f"resume from {rp.path.name}: written by {rp.saved_world_size} ranks, would convert it to the "
                f"universal format for {world} ranks ({rp.path / reshard.UNIVERSAL}); {same}")
    return f"resume from {rp.path.name} ({rp.path}, written by {rp.saved_world_size} ranks); {same}"


def check_wandb_section(cfg: RunConfig) -> str:
    from mythos.train.wandb_log import check_wandb, run_id

    w = cfg.log.wandb
    check_wandb(w)
    if w.mode == "disabled":
        return "disabled"
    return f"{w.mode}, project {w.project}, run id {run_id(cfg.run_dir, cfg.name)} (same id on every resume)"


def plan_lines(cfg: RunConfig, seq_len: int, steps: int, gpus: int, peak_tflops: float, mfu: float) -> list[str]:
    """Steps, tokens, parameters, FLOPs and GPU-hours (the accounting of ``mythos-plan``)."""
    from mythos.accounting import arm_costs

    c = arm_costs(cfg, seq_len)
    tokens = steps * cfg.train.global_batch_size * seq_len
    rate = peak_tflops * 1e12 * mfu
    gpu_h, hw_h = c.model * tokens / rate / 3600, c.hardware * tokens / rate / 3600
    loops = f" (RDT at E[T]={c.loops_expected:.3g}; executed {c.loops_executed:.3g} loops)" if c.loops_expected else ""
    return [
        f"steps        {steps} x {cfg.train.global_batch_size} samples x {seq_len} tokens = {_si(tokens)} tokens",
        f"parameters   {_si(c.params)} ({_si(c.non_embedding)} non-embedding)",
        f"model FLOPs  {_si(c.model)}/token{loops}, {_si(c.model * tokens)} in total",
        f"hw FLOPs     {_si(c.hardware)}/token (executed loops + recompute), {_si(c.hardware * tokens)} in total",
        f"GPU-hours    {gpu_h:.4g} (model FLOPs) / {hw_h:.4g} (hardware FLOPs) at MFU {mfu:g} of "
        f"{peak_tflops:g} TFLOP/s; wall {gpu_h / gpus:.4g} h on {gpus} GPUs",
    ]


def _peak(cfg: RunConfig, given: float | None) -> float:
    if given:
        return given
    if cfg.log.peak_tflops:
        return cfg.log.peak_tflops
    from mythos import dist

    if dist.is_cuda():
        import torch

        from mythos.accounting import peak_flops_for_device

        found = peak_flops_for_device(torch.cuda.get_device_name())
        if found:
            return found / 1e12
    return DEFAULT_PEAK_TFLOPS


def dry_run(config: str, overrides: Sequence[str], *, gpus: int | None = None, peak_tflops: float | None = None,
            mfu: float = 0.4, out: Any = None) -> int:
    """Print config, DeepSpeed config, plan and verdicts to ``out`` (stdout); returns 0 or 2."""
    out = out or sys.stdout
    world = gpus or int(os.environ.get("WORLD_SIZE", 0)) or DEFAULT_GPUS
    cuda = os.environ.get("DS_ACCELERATOR", "") != "cpu"
    verdicts: list[Verdict] = []
    cfg: RunConfig | None = None

    def load() -> str:
        nonlocal cfg
        cfg = load_run_config(config, overrides)
        return f"{config} + {len(overrides)} override(s) loaded strictly"

    if _run("config", load, verdicts):
        assert cfg is not None
        print(f"== resolved run config ({config})", file=out)
        print(dump_yaml(cfg), file=out)
        print(f"== derived DeepSpeed config ({world} ranks, {'GPU' if cuda else 'CPU'})", file=out)
        ds: dict[str, Any] = {}

        def deepspeed() -> str:
            from mythos.train.ds_config import build_ds_config

            nonlocal ds
            ds = build_ds_config(cfg, world, cuda)
            return f"{cfg.deepspeed.config}: ZeRO stage {ds.get('zero_optimization', {}).get('stage', 0)}"

        _run("deepspeed", deepspeed, verdicts)
        print(json.dumps(ds, indent=2, sort_keys=True) if ds else "(not derived: see the deepspeed check)", file=out)

        def geometry() -> str:
            from mythos.data.order import check_batch_geometry

            accum = check_batch_geometry(cfg.train.global_batch_size, cfg.train.micro_batch_size, world)
            return (f"{world} ranks x micro batch {cfg.train.micro_batch_size} x {accum} accumulation steps "
                    f"= global batch {cfg.train.global_batch_size}")

        _run("world size", geometry, verdicts)

        def run_dir() -> str:  # also inside check_run ("fit"); here so it is judged without the data
            from pathlib import Path

            from mythos.cli_common import check_out_dir

            check_out_dir(cfg.run_dir, "run_dir")
            where = Path(cfg.run_dir).resolve()
            return f"{where} {'exists' if where.is_dir() else 'can be created'} and is writable"

        _run("run dir", run_dir, verdicts)
        data_ok = _run("data", lambda: check_data(cfg), verdicts)
        _run("wandb", lambda: check_wandb_section(cfg), verdicts)
        fit: dict[str, Any] = {}

        def fits() -> str:
            from mythos.train.checks import check_run

            # wandb has its own verdict above; the rest of check_run is what a start runs
            quiet = dataclasses.replace(cfg, log=dataclasses.replace(cfg.log, wandb=WandbConfig()))
            fit.update(check_run(quiet, world))
            return (f"vocab {fit['vocab_size']} <= model.vocab_size {cfg.model.vocab_size}; seq_len {fit['seq_len']} "
                    f"<= model.max_seq_len {cfg.model.max_seq_len}; {fit['steps']} steps fit "
                    f"{cfg.train.max_epochs} epoch(s) of {fit['steps_per_epoch']} steps")

        if data_ok:
            _run("fit", fits, verdicts)
        else:
            _skip("fit", "needs the data", verdicts)
        _run("resume", lambda: check_resume(cfg, world, data_ok), verdicts)

        print("== plan", file=out)
        seq_len = fit.get("seq_len") or cfg.model.max_seq_len
        tps = cfg.train.global_batch_size * seq_len
        steps = fit.get("steps") or cfg.train.max_steps or math.ceil(cfg.train.max_tokens / tps)
        if not fit:
            print(f"(data unresolved: seq_len = model.max_seq_len = {seq_len})", file=out)
        lines: list[str] = []

        def plan() -> str:
            lines.extend(plan_lines(cfg, seq_len, steps, world, _peak(cfg, peak_tflops), mfu))
            return f"{steps} steps planned"

        _run("plan", plan, verdicts)
        print("\n".join(lines), file=out)

    print("== checks", file=out)
    for v in verdicts:
        tag = {True: "ok  ", False: "FAIL", None: "skip"}[v.ok]
        print(f"{tag} {v.name:<11} {v.detail}", file=out)
    failed = [v for v in verdicts if v.ok is False]
    if failed:
        print(f"error: {failed[0].name}: {failed[0].detail}", file=sys.stderr)
        return 2
    print("dry run: all checks pass (nothing was started)", file=out)
    return 0
