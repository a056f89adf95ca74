"""Submit pretraining to SLURM after validating the run for the world size it will get.

    python launch/slurm/submit.py --config configs/run/rdt-770m.yaml --nodes 4 --gpus-per-node 8 \\
        --partition gpu --account proj --time 24:00:00 [--dependency afterok:123] [--dry-run] [key=value ...]
    python launch/slurm/submit.py --config configs/run/rdt-tiny-cpu.yaml --nodes 2 --cpu-ranks-per-node 1
    python launch/slurm/submit.py --a configs/run/rdt-770m.yaml --b configs/run/dense-1.3b.yaml --nodes 4 ...

The config is loaded with its overrides and checked exactly as the trainer checks it before its
process group (batch divisible by nodes x ranks per node, shards present, vocab, token budget vs
data, ...). Any problem prints one ``error:`` line and exits 2 with nothing submitted. ``--a/--b``
(older spelling: ``--pair A B``) submits the two arms of a matched comparison and first asserts
that they train on identical data (same ``data:`` section, seed and global batch) and write to
different run dirs.

Prints ``submitted job ID  run_dir=DIR  log=FILE`` per job (``--dry-run``: the sbatch command).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runstate import REPO, ResolvedRun, resolve  # noqa: E402

from mythos.cli_common import ArgumentParser, fail  # noqa: E402
from mythos.config import ConfigError, to_dict  # noqa: E402

SBATCH_SCRIPT = REPO / "launch" / "slurm" / "pretrain.sbatch"
SIGNAL_LEAD_S = 300
"""Default seconds between the USR1 warning and the time limit (``#SBATCH --signal`` in the script)."""


class SubmitError(Exception):
    """A problem with the submission itself (exit 2, one line)."""


@dataclass(frozen=True)
class Layout:
    nodes: int
    ranks_per_node: int
    gpus_per_node: int  # 0 = CPU ranks

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node

    @property
    def device(self) -> str:
        return "gpu" if self.gpus_per_node else "cpu"


def parse_slurm_time(value: str) -> int:
    """Seconds of a SLURM time limit: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", value.strip())
    if not m:
        raise SubmitError(f"--time {value!r} is not a SLURM time (HH:MM:SS, D-HH:MM:SS or minutes)")
    days, a, b, c = (int(g) if g is not None else None for g in m.groups())
    if days is not None:  # D-H[:M[:S]]
        return ((days * 24 + a) * 60 + (b or 0)) * 60 + (c or 0)
    if c is not None:  # H:M:S
        return (a * 60 + b) * 60 + c
    if b is not None:  # M:S
        return a * 60 + b
    return a * 60  # M


def check_pair(a: ResolvedRun, b: ResolvedRun) -> None:
    """The two arms of a comparison must see exactly the same batches: the data order depends
    only on (shards, data seed, global batch), so those must match, as must the init seed."""
    problems = []
    if to_dict(a.cfg.data) != to_dict(b.cfg.data):
        diff = sorted(k for k, v in to_dict(a.cfg.data).items() if to_dict(b.cfg.data).get(k) != v)
        problems.append(f"data sections differ in {', '.join(f'data.{k}' for k in diff)}")
    elif a.plan["data_hash"] != b.plan["data_hash"]:
        problems.append("the shards' data hashes differ")
    for key in ("seed", "global_batch_size"):
        va, vb = getattr(a.cfg.train, key), getattr(b.cfg.train, key)
        if va != vb:
            problems.append(f"train.{key} differs ({va} vs {vb})")
    if a.run_dir == b.run_dir:
        problems.append(f"both write to run_dir {a.run_dir}")
    if problems:
        raise SubmitError(f"--a {a.config_path.name} --b {b.config_path.name}: not a matched comparison: "
                          + "; ".join(problems))


def sbatch_command(run: ResolvedRun, layout: Layout, args: argparse.Namespace, overrides: list[str]) -> list[str]:
    cmd = [
        "sbatch", "--parsable",
        f"--job-name=mythos-{run.cfg.name}",
        f"--nodes={layout.nodes}",
        f"--ntasks-per-node={layout.ranks_per_node}",
        f"--output={run.run_dir / 'logs' / 'slurm-%j.out'}",
    ]
    if layout.gpus_per_node:
        cmd.append(f"--gpus-per-node={layout.gpus_per_node}")
    optional = {"--cpus-per-task": args.cpus_per_task, "--partition": args.partition, "--account": args.account,
                "--time": args.time, "--dependency": args.dependency}
    cmd += [f"{flag}={value}" for flag, value in optional.items() if value]
    if args.signal_lead is not None:
        cmd.append(f"--signal=B:USR1@{args.signal_lead}")
    cmd += args.sbatch_arg
    return [*cmd, str(SBATCH_SCRIPT), str(run.config_path), *overrides]


def submit(cmd: list[str], env: dict[str, str]) -> str:
    if shutil.which(cmd[0]) is None:
        raise SubmitError("sbatch not found on PATH (run this on a SLURM login node)")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        msg = " ".join(proc.stderr.split()) or f"exit status {proc.returncode}"
        raise SubmitError(f"sbatch failed: {msg}")
    return proc.stdout.strip().split(";")[0]


def build_parser() -> ArgumentParser:
    """The ``launch/slurm/submit.py`` argument parser (checked further by :func:`parse_args`)."""
    p = ArgumentParser(prog="launch/slurm/submit.py", description=__doc__)
    what = p.add_argument_group("what to submit: --config, or the two arms --a and --b")
    what.add_argument("--config", metavar="CONFIG",
                      help="run config YAML (configs/run/*.yaml) or preset name (required, unless --a/--b)")
    what.add_argument("--a", metavar="CONFIG",
                      help="run config of arm A of a matched comparison (with --b; default: none, one run)")
    what.add_argument("--b", metavar="CONFIG",
                      help="run config of arm B of a matched comparison (with --a; default: none, one run)")
    what.add_argument("--pair", nargs=2, metavar=("A", "B"), help=argparse.SUPPRESS)  # older spelling of --a/--b
    p.add_argument("--nodes", type=int, required=True, help="nodes per job")
    per_node = p.add_mutually_exclusive_group()
    per_node.add_argument("--gpus-per-node", type=int, help="GPU nodes: one rank per GPU (default 8)")
    per_node.add_argument("--cpu-ranks-per-node", type=int, help="CPU nodes: ranks per node (gloo; default: GPU nodes)")
    p.add_argument("--cpus-per-task", type=int,
                   help="CPU cores per rank (OMP_NUM_THREADS follows it; default: the cluster's)")
    p.add_argument("--partition", help="SLURM partition (default: the cluster's)")
    p.add_argument("--account", help="SLURM account (default: the cluster's)")
    p.add_argument("--time", help="time limit, e.g. 24:00:00 (must exceed the USR1 warning lead; default: the "
                                  "partition's)")
    p.add_argument("--dependency", help="e.g. afterok:123 (start after a data-prep job; default: none)")
    p.add_argument("--signal-lead", type=int, metavar="S",
                   help=f"send the checkpoint-and-requeue USR1 S seconds before the limit (default {SIGNAL_LEAD_S})")
    p.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                   help="extra sbatch option, repeatable (e.g. --sbatch-arg=--exclusive --sbatch-arg=--qos=high)")
    p.add_argument("--dry-run", action="store_true", help="validate and print the sbatch command(s) only")
    p.add_argument("overrides", nargs="*", help="key.sub=value config overrides, e.g. train.max_steps=100")
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse and check the command line (usage errors: one ``error:`` line, exit 2)."""
    p = build_parser()
    args = p.parse_args(argv)
    if args.pair:
        if args.a or args.b:
            p.error("give the arms as --a A --b B (--pair A B is the older spelling), not both")
        args.a, args.b = args.pair
    if (args.a is None) != (args.b is None):
        p.error("a matched comparison needs both --a and --b")
    if args.a is not None and args.config:
        p.error("give --config, or the two arms --a and --b, not both")
    if args.a is None and not args.config:
        p.error("one of --config or --a/--b is required")
    args.pair = [args.a, args.b] if args.a is not None else None
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        p.error(f"overrides must look like key.sub=value: {' '.join(bad)}")
    return args


def layout_of(args: argparse.Namespace) -> Layout:
    if args.cpu_ranks_per_node is not None:
        layout = Layout(args.nodes, args.cpu_ranks_per_node, 0)
    else:
        gpus = 8 if args.gpus_per_node is None else args.gpus_per_node
        layout = Layout(args.nodes, gpus, gpus)
    if layout.nodes < 1 or layout.ranks_per_node < 1:
        raise SubmitError("--nodes and the ranks per node must be >= 1")
    if args.time:
        lead = SIGNAL_LEAD_S if args.signal_lead is None else args.signal_lead
        if parse_slurm_time(args.time) <= lead:
            raise SubmitError(f"--time {args.time} leaves no training before the USR1 warning {lead} s before the "
                              "limit; raise --time or lower --signal-lead")
    return layout


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        layout = layout_of(args)
        configs = args.pair or [args.config]
        runs = [resolve(c, args.overrides, layout.world_size) for c in configs]
        if args.pair:
            check_pair(*runs)
        env = dict(os.environ)
        env["MYTHOS_ROOT"] = str(REPO)
        env["MYTHOS_DEVICE"] = layout.device
        env.setdefault("MYTHOS_PYTHON", sys.executable)  # the interpreter that just validated the config
        for run in runs:
            cmd = sbatch_command(run, layout, args, args.overrides)
            if args.dry_run:
                print(shlex.join(cmd))
                continue
            (run.run_dir / "logs").mkdir(parents=True, exist_ok=True)  # sbatch --output needs it
            job = submit(cmd, env)
            print(f"submitted job {job}  run_dir={run.run_dir}  log={run.run_dir / 'logs' / f'job-{job}.log'}")
    except (ConfigError, SubmitError, ValueError, OSError) as exc:
        return fail(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
