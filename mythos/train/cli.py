"""Pretrain a dense baseline or an RDT with DeepSpeed: the training entry point.

    deepspeed --num_gpus 8 --module mythos.train --config configs/run/rdt-770m.yaml [key.sub=value ...]
    torchrun --nproc_per_node 8 -m mythos.train --config rdt-770m [key.sub=value ...]
    srun ... python -m mythos.train --config ...            (one task per device, launch/slurm/)
    deepspeed --num_gpus 8 launch/pretrain.py --config ...   (a checkout, not installed: same main)
    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 deepspeed --num_gpus 2 --module mythos.train \\
        --config configs/run/rdt-tiny-cpu.yaml run_dir=/tmp/x train.max_steps=20
    python -m mythos.train --config rdt-770m --dry-run [--gpus 64 --peak-tflops 989.5 --mfu 0.4]

All launchers provide RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT. Bad configs fail
with one line (exit 2) before any process group starts. Any later error in a rank ends it at once
with one `error:` line and exit 1, which ends the job (docs/slurm.md, "When one rank fails").
``--dry-run`` resolves and checks everything a launch would, starts nothing, and exits 0 when
every check passes, 2 with the failing check's line otherwise (:mod:`mythos.train.dryrun`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

from mythos.cli_common import ArgumentParser
from mythos.cli_common import fail as fail_usage
from mythos.config import ConfigError
from mythos.train.config import load_run_config


def build_parser() -> ArgumentParser:
    """The ``mythos-train`` / ``python -m mythos.train`` argument parser."""
    p = ArgumentParser(prog="mythos-train", description=__doc__)
    p.add_argument("--config", required=True, help="run config YAML (configs/run/*.yaml) or preset name")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    d = p.add_argument_group("--dry-run: check and plan, start nothing")
    d.add_argument("--dry-run", action="store_true",
                   help="print the resolved config, the DeepSpeed config, the plan and every check's verdict")
    d.add_argument("--gpus", type=int, default=None, help="world size to plan for (default: $WORLD_SIZE, else 8)")
    d.add_argument("--peak-tflops", type=float, default=None,
                   help="per-device dense peak (default: log.peak_tflops, else 989.5 = H100 SXM bf16)")
    d.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation for GPU-hours")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.max_steps=20")
    return p


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Parse the command line: ``(args, key=value overrides)``; usage errors are one line, exit 2."""
    p = build_parser()
    args, unknown = p.parse_known_args(argv)
    bad = [u for u in unknown if "=" not in u]
    if bad:
        p.error(f"unrecognised arguments: {' '.join(bad)}")
    return args, list(args.overrides) + unknown


def main(argv: list[str] | None = None, *, process: bool = False) -> int:
    """Train (or ``--dry-run``); returns the exit code. ``process``: this call *is* the process
    (``python -m``, the launch/ wrapper), so a failing rank may force its exit; a test that
    imports :func:`main` leaves it False and gets the code back."""
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    if args.dry_run:
        from mythos.train.dryrun import dry_run

        return dry_run(args.config, overrides, gpus=args.gpus, peak_tflops=args.peak_tflops, mfu=args.mfu)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    from mythos.train.trainer import Trainer, TrainingStopped

    try:
        cfg = load_run_config(args.config, overrides)
        trainer = Trainer(cfg)
    except (ConfigError, FileNotFoundError) as exc:
        return fail_usage(exc)
    except Exception as exc:
        return fail(exc, process)
    try:
        trainer.fit()  # its `finally` stops the DataLoader workers on every exit path
    except TrainingStopped as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except Exception as exc:
        return fail(exc, process)
    from mythos import dist

    dist.finish()
    return 0


def one_line(exc: BaseException) -> str:
    """``Type: message`` on one line. An exception raised in a DataLoader worker arrives re-raised
    with the worker's whole traceback as its message; its last line holds the original message."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = lines[-1] if len(lines) > 1 and "Original Traceback" in lines[1] else (lines[0] if lines else "")
    qualified = f"{type(exc).__module__}.{type(exc).__qualname__}: "
    return f"{type(exc).__name__}: {text.removeprefix(qualified)}"


def fail(exc: Exception, process: bool = False) -> int:
    """End this rank now, with exit 1 and one ``error:`` line. Expected failures (bad data, a
    config discovered mid-run) print only that line; anything else gets its traceback first.

    Exiting promptly is what ends the job: the other ranks' next collective fails at once
    ("Connection closed by peer") instead of waiting for ``train.dist_timeout_s``, and the launcher
    (``deepspeed``: on any non-zero exit; SLURM: ``srun --kill-on-bad-exit``) kills what is left."""
    if not isinstance(exc, ConfigError):
        traceback.print_exception(exc)
    print(f"error: {one_line(exc)}", file=sys.stderr, flush=True)
    from mythos import dist

    # force the exit only when this call is the process (not when a test imports main())
    dist.shutdown(1, grace_s=15.0 if process else None)
    return 1


def run() -> int:
    """Console/``python -m`` entry: :func:`main` as the process, which ends here with its code.

    Why ``os._exit`` and not a return: after a run that finished (process group destroyed, every
    file closed by the trainer's ``finally``) the interpreter's teardown can still abort a rank in a
    C++ destructor ("terminate called without an active exception", exit -6, and the launcher then
    kills the job as failed), seen in CI on ~1 in 40 two-rank launches even after
    :func:`mythos.dist.finish`. Nothing is left to run at that point but teardown, so skip it."""
    code = main(process=True)
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)
