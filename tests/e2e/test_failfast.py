"""Fail fast, never hang: an error in one rank ends the whole 2-rank job promptly, non-zero, with a
one-line cause, and leaves no process behind -- DataLoader workers included, although they ignore
SIGTERM (they must, for SLURM preemption; see ``_ignore_stop_signals`` in mythos/data/loader.py)."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from train_utils import REPO, ds_env, kill_group, launch_cmd, rank_pids, train_losses

pytestmark = pytest.mark.slow

DENSE = "configs/run/dense-tiny-cpu.yaml"
#: Seconds the job may take to end after the shard is truncated. The fix needs ~3 s; without it a
#: rank hangs at exit joining its workers, until the other rank's collective times out
#: (train.dist_timeout_s=120 from TINY) or forever when both ranks hit the error.
EXIT_LIMIT_S = 60


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def _ranks_and_workers(launcher: subprocess.Popen) -> tuple[list[psutil.Process], list[psutil.Process]]:
    """The job's training processes: ranks, and their DataLoader workers (forked children of a rank,
    so they share its command line)."""
    procs = [p for p in psutil.Process(launcher.pid).children(recursive=True)
             if any(a.startswith("--local_rank=") for a in p.cmdline())]
    pids = {p.pid for p in procs}
    ranks = [p for p in procs if p.ppid() not in pids]
    return ranks, [p for p in procs if p.ppid() in pids]


def _wait_until_training(run_dir: Path, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    """Until step 2 is logged and both ranks run their 2 DataLoader workers each."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if max(train_losses(run_dir), default=0) >= 2:
            with contextlib.suppress(psutil.Error):
                ranks, workers = _ranks_and_workers(proc)
                if len(ranks) == 2 and len(workers) == 4:
                    return
        if proc.poll() is not None:
            raise AssertionError(f"training exited early ({proc.returncode}):\n{log.read_text()[-4000:]}")
        time.sleep(0.2)
    raise AssertionError(f"training did not get under way in {timeout}s")


def test_close_stops_workers_that_ignore_sigterm(data_corpus) -> None:
    """``TrainLoader.close()`` ends its workers at once, even while something (an exception's
    traceback, in a failing trainer) still holds the iterator, so garbage collection would not."""
    from mythos.data import DataConfig, build_train_loader

    loader = build_train_loader(DataConfig(shards=str(data_corpus.shards_dir), num_workers=2), 8, 4)
    loader.next_step()
    held = loader._it  # what a traceback frame would keep alive
    workers = psutil.Process().children()
    try:
        assert len(workers) == 2
        for w in workers:
            w.send_signal(signal.SIGTERM)  # ignored: the preemption behaviour stays
        time.sleep(0.5)
        assert len(_alive(workers)) == 2
        t0 = time.monotonic()
        loader.close()
        assert not _alive(workers) and time.monotonic() - t0 < 15
        loader.close()  # idempotent
    finally:
        if _alive(workers):  # else this very bug hangs pytest's exit, joining them
            held._shutdown_workers()
            for w in _alive(workers):
                w.kill()
    del held


def test_truncated_shard_mid_run_ends_the_job_promptly(data_corpus, tmp_path: Path) -> None:
    shards, run_dir = tmp_path / "shards", tmp_path / "run"
    shutil.copytree(data_corpus.shards_dir, shards)  # a private copy: this test corrupts it
    # ~800 steps per epoch: the run is far from done when the shard breaks. Samples are shuffled
    # over 7 shards, so a step's 8 samples hit the broken shard within a step or two.
    overrides = ["train.max_steps=700", "train.save_interval=0", "data.num_workers=2", "data.verify=size"]
    out_log, err_log = tmp_path / "stdout.log", tmp_path / "stderr.log"
    with open(out_log, "w") as out, open(err_log, "w") as err:
        proc = subprocess.Popen(
            launch_cmd(DENSE, run_dir, shards, overrides, launcher="deepspeed"), cwd=REPO, env=ds_env(),
            stdout=out, stderr=err, text=True, start_new_session=True,
        )
    try:
        _wait_until_training(run_dir, proc, err_log)
        # every process of the job (launcher, ranks, workers), to check afterwards that none survived
        job = psutil.Process(proc.pid).children(recursive=True)
        broken = shards / "train-00001.tar"
        with open(broken, "r+b") as f:  # truncated under the running job, after its start-up checks
            f.truncate(4096)
        t0 = time.monotonic()
        try:
            proc.wait(timeout=EXIT_LIMIT_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"job still running {EXIT_LIMIT_S}s after the shard broke; stderr:\n{err_log.read_text()[-4000:]}"
            ) from None
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            kill_group(proc)  # a failing test leaves nothing behind

    stderr = err_log.read_text()
    assert proc.returncode != 0, stderr[-4000:]
    cause = [ln for ln in stderr.splitlines() if ln.startswith("error: DataFormatError:")]
    assert cause and f"shard {broken}: short read" in cause[0], stderr[-4000:]
    assert "forcing exit" not in stderr  # ended by the clean path, not by the last-resort watchdog
    assert not _alive(job), f"left behind: {[(p.pid, p.cmdline()[:4]) for p in _alive(job)]}"
    assert not rank_pids(run_dir)  # no rank nor worker (same cmdline) of this run anywhere
    print(json.dumps({"exit_after_truncation_s": round(elapsed, 1), "returncode": proc.returncode}))
