"""SLURM launch on a real local cluster: slurmctld + two slurmd "nodes" (127.0.0.1, 127.0.0.2) on
this machine, started once per test session (the ``slurm_cluster`` fixture in tests/conftest.py, shared with
tests/e2e/test_data_partition.py) by tests/cluster/slurm_up.sh (root; installs Debian's
slurm packages when missing) and stopped by slurm_down.sh.

Covers launch/slurm/: a 2-node x 1-rank job through the real pretrain.sbatch and srun (same
losses as the deepspeed launcher), the time-limit warning (USR1 to the batch shell, as
``--signal=B:USR1@N`` sends it; during start-up and mid-training) -> checkpoint -> self-requeue
-> exact resume, preemption (SIGTERM to every process, SLURM requeues) -> checkpoint -> exact
resume, and submissions that must fail before anything is queued.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from slurm_utils import LocalSlurm
from train_utils import REPO, TINY, run_training, train_losses

from mythos.run_dir import is_complete, list_tags

pytestmark = pytest.mark.slow

RDT = "configs/run/rdt-tiny-cpu.yaml"
STEPS = 40  # long enough that two interruptions land mid-run; ~0.1 s per step


@pytest.fixture(scope="module")
def shards(data_corpus) -> Path:
    return data_corpus.shards_dir


def _train_args(run_dir: Path, shards: Path, *extra: str) -> list[str]:
    return [f"run_dir={run_dir}", f"data.shards={shards}", *TINY, f"train.max_steps={STEPS}", *extra]


def _submit_ok(slurm_cluster: LocalSlurm, run_dir: Path, shards: Path, *extra: str) -> tuple[str, Path]:
    """Submit the tiny RDT on 2 nodes x 1 CPU rank; returns (job id, the job's log in the run dir)."""
    proc = slurm_cluster.submit("--config", RDT, "--nodes", "2", "--cpu-ranks-per-node", "1",
                          *_train_args(run_dir, shards, *extra))
    m = re.match(r"submitted job (\d+)\s+run_dir=(\S+)\s+log=(\S+)", proc.stdout)
    assert proc.returncode == 0 and m, f"submit failed ({proc.returncode}): {proc.stdout}{proc.stderr}"
    assert Path(m.group(2)) == run_dir
    return m.group(1), Path(m.group(3))


def _wait_step(slurm_cluster: LocalSlurm, job_id: str, run_dir: Path, log: Path, step: int, restarts: int) -> None:
    """Wait until attempt ``restarts`` of the job is running and has logged ``step``."""
    def reached(info: dict[str, str]) -> bool:
        return (info["JobState"] == "RUNNING" and int(info["Restarts"]) == restarts
                and max(train_losses(run_dir), default=0) >= step)

    slurm_cluster.wait(job_id, reached, f"step {step} in attempt {restarts}", log, timeout=240)


@pytest.fixture(scope="module")
def reference(slurm_cluster: LocalSlurm, shards: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An uninterrupted 2-node run (the loss reference); returns (run dir, job log)."""
    run_dir = tmp_path_factory.mktemp("slurm_runs") / "reference"
    job_id, log = _submit_ok(slurm_cluster, run_dir, shards)
    info = slurm_cluster.wait_done(job_id, log)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log.read_text()[-4000:]
    assert info["Restarts"] == "0"
    return run_dir, log


def test_two_node_job_trains_and_checkpoints(reference: tuple[Path, Path]) -> None:
    run_dir, log = reference
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["total_steps"] == STEPS
    tags = list_tags(run_dir / "checkpoints")
    assert tags and tags[-1][0] == STEPS and is_complete(tags[-1][1])
    assert sorted(train_losses(run_dir)) == list(range(1, STEPS + 1))
    text = log.read_text()
    # one rank per node, each line prefixed with node:rank
    assert "[127.0.0.1:0] " in text and "[127.0.0.2:1] " in text
    assert "nodes 2 x 1 tasks = world 2 (cpu)" in text
    assert "requeue" not in text


def test_srun_launch_matches_deepspeed_launcher(reference: tuple[Path, Path], shards: Path, tmp_path: Path) -> None:
    """srun + task_entry.sh and the deepspeed launcher give bit-identical losses (same world size)."""
    run_dir, _ = reference
    ds_dir = tmp_path / "ds"
    run_training(RDT, ds_dir, shards, [f"train.max_steps={STEPS}"], nproc=2, timeout=600)
    assert train_losses(ds_dir) == train_losses(run_dir)


def test_time_limit_warning_and_preemption_resume_exactly(
    slurm_cluster: LocalSlurm, reference: tuple[Path, Path], shards: Path, tmp_path: Path
) -> None:
    """One job, four attempts, every step's loss bit-identical to the uninterrupted reference:

    0. USR1 to the batch shell only (what ``--signal=B:USR1@N`` does) while the ranks start up:
       they die of it before the trainer has a handler; nothing is lost, the script requeues.
    1. USR1 mid-training: forwarded to the ranks, they checkpoint and exit 0, the script requeues.
    2. ``scontrol requeue`` mid-training (what preemption with PreemptMode=REQUEUE does): SIGTERM
       to every process of the job; the ranks checkpoint; SLURM requeues.
    3. Runs to the end."""
    ref_dir, _ = reference
    run_dir = tmp_path / "preempted"
    job_id, log = _submit_ok(slurm_cluster, run_dir, shards)

    slurm_cluster.wait(job_id, lambda i: log.exists() and "| config " in log.read_text(), "start of srun", log)
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", job_id)
    _wait_step(slurm_cluster, job_id, run_dir, log, step=3, restarts=1)
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", job_id)
    _wait_step(slurm_cluster, job_id, run_dir, log, step=12, restarts=2)
    stopped_at = [s for s, _ in list_tags(run_dir / "checkpoints")]
    slurm_cluster.run("scontrol", "requeue", job_id)
    info = slurm_cluster.wait_done(job_id, log)

    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-4000:]
    assert info["Restarts"] == "3", text[-4000:]
    assert text.count("received SIGUSR1") == 2 and text.count("received SIGTERM") == 1
    assert text.count("requeued") == 2  # attempts 0 and 1 requeued themselves; SLURM requeued attempt 2
    signal_stops = [int(s) for s in re.findall(r"stopping on signal at step (\d+)", text)]
    assert len(signal_stops) == 2 and 3 <= signal_stops[0] < signal_stops[1] < STEPS, signal_stops
    assert stopped_at == [signal_stops[0]]  # the USR1 stop left exactly one (complete) checkpoint
    assert text.count("resumed from") == 2
    assert train_losses(run_dir) == train_losses(ref_dir)


def test_preemption_with_dataloader_workers_saves(slurm_cluster: LocalSlurm, shards: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "workers"
    job_id, log = _submit_ok(slurm_cluster, run_dir, shards, "data.num_workers=2")
    try:
        _wait_step(slurm_cluster, job_id, run_dir, log, step=3, restarts=0)
        slurm_cluster.run("scontrol", "requeue", job_id)
        slurm_cluster.wait(job_id, lambda i: "training step exited" in (log.read_text() if log.exists() else ""),
                     "the first attempt's exit", log, timeout=120)
        assert "stopping on signal" in log.read_text(), log.read_text()[-3000:]
    finally:
        slurm_cluster.cancel(job_id)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--config", "configs/run/does-not-exist.yaml", "--nodes", "2", "--cpu-ranks-per-node", "1"],
         "config not found"),
        (["--config", RDT, "--nodes", "3", "--cpu-ranks-per-node", "1"], "not divisible by world size 3"),
        (["--config", RDT, "--nodes", "2", "--cpu-ranks-per-node", "1", "--time", "00:04:00"],
         "leaves no training before the USR1 warning"),
        (["--pair", RDT, "UNMATCHED", "--nodes", "2", "--cpu-ranks-per-node", "1"],
         "not a matched comparison: data sections differ in data.seed"),
    ],
    ids=["missing-config", "batch-not-divisible", "time-below-warning", "pair-data-mismatch"],
)
def test_bad_submissions_fail_fast(slurm_cluster: LocalSlurm, shards: Path, tmp_path: Path, args: list[str],
                                   message: str) -> None:
    """Validation runs before sbatch: one error line, exit 2, nothing queued, no run dir."""
    if "UNMATCHED" in args:  # a "baseline" whose data order differs from the RDT arm's
        other = tmp_path / "dense-other-seed.yaml"
        text = (REPO / "configs/run/dense-tiny-cpu.yaml").read_text()
        other.write_text(text.replace("data: configs/data/demo.yaml",
                                      "data: {include: configs/data/demo.yaml, seed: 7}"))
        args = [str(other) if a == "UNMATCHED" else a for a in args]
    before = slurm_cluster.queue()
    proc = slurm_cluster.submit(*args, f"data.shards={shards}", *TINY, f"run_dir={tmp_path / 'never'}")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert proc.stdout == ""
    assert set(slurm_cluster.queue()) <= set(before)  # nothing new was queued
    assert not (tmp_path / "never").exists()


def test_pair_dry_run_prints_both_arms(slurm_cluster: LocalSlurm, shards: Path, tmp_path: Path) -> None:
    proc = slurm_cluster.submit("--pair", RDT, "configs/run/dense-tiny-cpu.yaml", "--nodes", "2",
                          "--cpu-ranks-per-node", "1", "--partition", "test", "--dependency", "afterok:1",
                          "--dry-run", f"data.shards={shards}", *TINY)
    assert proc.returncode == 0, proc.stderr
    cmds = proc.stdout.strip().splitlines()
    assert len(cmds) == 2
    for cmd, name in zip(cmds, ("rdt-tiny-cpu", "dense-tiny-cpu")):
        assert cmd.startswith("sbatch --parsable") and f"--job-name=mythos-{name}" in cmd
        assert "--nodes=2 --ntasks-per-node=1" in cmd and "--dependency=afterok:1" in cmd
        assert "--partition=test" in cmd and "launch/slurm/pretrain.sbatch" in cmd
