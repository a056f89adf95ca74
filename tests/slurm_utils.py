"""The private test SLURM cluster (tests/cluster/slurm_up.sh): free ports, and :class:`LocalSlurm`,
the handle the session fixture ``slurm_cluster`` (tests/conftest.py) yields to the SLURM tests."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from train_utils import REPO, ds_env

CLUSTER = REPO / "tests" / "cluster"
SUBMIT = REPO / "launch" / "slurm" / "submit.py"
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
#: slurm_up.sh exit codes -> why no cluster
UP_ERRORS = {3: "not root", 4: "apt-get cannot install slurmctld/slurmd/slurm-client/munge",
             5: "the SLURM daemons did not come up"}


def _ports_free(*ports: int) -> bool:
    for port in ports:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def _pick_ports() -> tuple[int, int]:
    """(slurmctld port, node port base): free ports C and B+1, B+2 (the two slurmds), so a second
    test cluster on this machine (another checkout's tests) does not collide with this one."""
    for base in range(17100, 30000, 37):
        if _ports_free(base, base + 1, base + 2, base + 3):
            return base + 3, base
    raise RuntimeError("no free ports for the test cluster")


class LocalSlurm:
    """The running test cluster: environment for slurm commands and job helpers."""

    def __init__(self, root: Path, conf: Path) -> None:
        self.root = root
        self.env = ds_env()  # DS_ACCELERATOR=cpu, OMP_NUM_THREADS=1, shared TORCH_EXTENSIONS_DIR
        self.env["SLURM_CONF"] = str(conf)

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=120)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr}")
        return proc

    def submit(self, *args: str) -> subprocess.CompletedProcess:
        return self.run(sys.executable, str(SUBMIT), *args, check=False)

    def queue(self) -> list[str]:
        return self.run("squeue", "-h", "-o", "%i").stdout.split()

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(tok.split("=", 1) for tok in out.split() if "=" in tok)

    def wait(self, job_id: str, until: Callable[[dict[str, str]], bool], what: str, log: Path,
             timeout: float = 300) -> dict[str, str]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(job_id)
            if until(info):
                return info
            if info["JobState"] in FINAL:
                break
            time.sleep(0.2)
        tail = log.read_text()[-4000:] if log.exists() else "(no job log)"
        raise AssertionError(f"job {job_id}: {what} did not happen (state {info['JobState']}):\n{tail}")

    def wait_done(self, job_id: str, log: Path, timeout: float = 300) -> dict[str, str]:
        return self.wait(job_id, lambda i: i["JobState"] in FINAL, "finishing", log, timeout)

    def cancel(self, job_id: str) -> None:
        """Cancel and wait until the job has left the nodes (so it cannot slow later tests)."""
        self.run("scancel", job_id, check=False)
        deadline = time.time() + 120
        while job_id in self.queue() and time.time() < deadline:
            time.sleep(0.2)
