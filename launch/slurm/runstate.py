"""Run-config checks and run state shared by ``submit.py`` (before ``sbatch``) and
``pretrain.sbatch`` (inside the job)::

    python launch/slurm/runstate.py resolve --world-size N --config CONFIG [key=value ...]
        validate the run for N ranks exactly as the trainer will; print the absolute run dir
    python launch/slurm/runstate.py finished RUN_DIR
        exit 0 if the run's final checkpoint is complete, 1 if training still has steps to go

Errors are one ``error:`` line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # run from a checkout without install

from mythos.config import ConfigError, resolve_config_path  # noqa: E402

if TYPE_CHECKING:  # importing the run config pulls in torch (~2 s): only where needed
    from mythos.train.config import RunConfig


@dataclass(frozen=True)
class ResolvedRun:
    config_path: Path
    """Absolute path of the run config file (presets and relative paths resolved)."""
    cfg: RunConfig
    plan: dict[str, Any]
    """``check_run``'s summary: steps, seq_len, data_hash, ..."""

    @property
    def run_dir(self) -> Path:
        """Absolute run dir; a relative ``run_dir`` is relative to the repo root, where the job runs."""
        p = Path(self.cfg.run_dir)
        return p if p.is_absolute() else REPO / p


def resolve(config: str, overrides: list[str], world_size: int) -> ResolvedRun:
    """Load the run config with overrides and run every check the trainer runs before starting
    a process group, for ``world_size`` ranks. Raises ``ConfigError`` (one line) on any problem."""
    from mythos.train.checks import check_run
    from mythos.train.config import load_run_config

    path = resolve_config_path(config, kind="run")
    try:
        cfg = load_run_config(path, overrides)
    except FileNotFoundError as exc:
        raise ConfigError(str(exc)) from exc
    return ResolvedRun(path, cfg, check_run(cfg, world_size))


def finished(run_dir: Path) -> bool:
    """True when the newest complete checkpoint is the run's last step (so a requeue would
    have nothing left to train)."""
    from mythos.run_dir import RUN_INFO, checkpoints, list_tags

    info = run_dir / RUN_INFO
    if not info.is_file():
        return False
    total = int(json.loads(info.read_text())["total_steps"])
    tags = list_tags(checkpoints(run_dir))
    return bool(tags) and tags[-1][0] >= total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("resolve", help="validate a run for a world size; print its run dir")
    r.add_argument("--config", required=True)
    r.add_argument("--world-size", type=int, required=True)
    r.add_argument("overrides", nargs="*")
    f = sub.add_parser("finished", help="exit 0 if the run has completed all its steps")
    f.add_argument("run_dir", type=Path)
    args = p.parse_args(argv)
    try:
        if args.cmd == "resolve":
            print(resolve(args.config, args.overrides, args.world_size).run_dir)
            return 0
        return 0 if finished(args.run_dir) else 1
    except (ConfigError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
