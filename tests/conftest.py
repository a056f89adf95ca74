"""Shared test fixtures and the test-session plumbing, for tests/unit and tests/e2e alike.

- ``data_corpus`` (session): a real ~1 MB Shakespeare corpus, tokenizer and shards.
- ``short_runs`` (session): two 4-step real training runs (tiny RDT + tiny dense, 2 CPU ranks,
  ZeRO-2, identical data) shared by the eval, compare, export and lm-eval tests.
- ``slurm_cluster`` (session): the private local SLURM cluster (tests/cluster/slurm_up.sh
  installs the Debian packages when missing and starts slurmctld + 2 slurmds), started once for
  every test that needs it (tests/e2e/test_slurm.py, tests/e2e/test_data_partition.py) whatever
  order they run in, and stopped at the end of the session.
- one intra-op thread for torch in the test process (``MYTHOS_TEST_THREADS`` to change it): on a
  shared 2-core machine two OpenMP threads spin against the training ranks and other jobs (a
  FlopCounterMode test went from 7 s to 214 s under load; the spawned ranks already get
  ``OMP_NUM_THREADS=1``).
- an autouse cleanup of DeepSpeed's CPU shared-memory all-reduce buffers: DeepSpeed never
  ``shm_unlink``s them, so every 2-rank launch leaves ~140 MB in /dev/shm, enough over a full
  suite to exhaust a small machine's RAM.

The helper modules (``train_utils``, ``slurm_utils``) live next to this file; this directory is
put on ``sys.path`` so ``from train_utils import ...`` works from any test folder.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

torch.set_num_threads(int(os.environ.get("MYTHOS_TEST_THREADS", "1")))

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from slurm_utils import CLUSTER, UP_ERRORS, LocalSlurm, _pick_ports  # noqa: E402
from train_utils import run_training  # noqa: E402

from data_prep.demo_corpus import SmallCorpus, build_test_corpus  # noqa: E402

RDT = "configs/run/rdt-tiny-cpu.yaml"
DENSE = "configs/run/dense-tiny-cpu.yaml"
SHM = Path("/dev/shm")
SHM_PREFIX = "deepspeed_allreduce_buffer_"


@pytest.fixture(scope="session")
def data_corpus(tmp_path_factory: pytest.TempPathFactory) -> SmallCorpus:
    """~1 MB of Shakespeare -> BPE vocab 1024 -> seq_len 64 shards (7 train + 1 val)."""
    return build_test_corpus(tmp_path_factory.mktemp("data_corpus"))


@pytest.fixture(scope="session")
def short_runs(data_corpus: SmallCorpus, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``{"rdt": RUN_DIR, "dense": RUN_DIR}``: 4 steps each (checkpoint at step 4, a val pass at
    steps 2 and 4), ZeRO-2, the session's Shakespeare shards; through the ``deepspeed`` launcher."""
    root = tmp_path_factory.mktemp("short_runs")
    runs = {}
    for name, config in (("rdt", RDT), ("dense", DENSE)):
        runs[name] = root / name
        run_training(config, runs[name], data_corpus.shards_dir,
                     ["train.max_steps=4", "train.save_interval=4", "train.eval_interval=2"], launcher="deepspeed")
    return runs


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSlurm]:
    """The session's private SLURM cluster (2 emulated nodes on free ports); skips the test when
    it cannot exist here (not root, packages not installable, daemons not up) -- with the reason.
    The first test that asks installs/starts it, whichever file that test is in."""
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster needs root (slurmd runs jobs as any user)")
    root = tmp_path_factory.mktemp("slurm")
    ctld_port, node_base = _pick_ports()
    env = dict(os.environ, SLURM_TEST_PORT=str(ctld_port), SLURM_TEST_NODE_PORT=str(node_base))
    t0 = time.time()
    up = subprocess.run([str(CLUSTER / "slurm_up.sh"), str(root)], env=env, capture_output=True, text=True,
                        timeout=900)
    if up.returncode != 0:
        pytest.skip(f"no local SLURM cluster: {UP_ERRORS.get(up.returncode, 'slurm_up.sh failed')} "
                    f"(exit {up.returncode}): {up.stderr.strip()[-600:]}")
    conf = up.stdout.strip().splitlines()[-1].removeprefix("export SLURM_CONF=")
    print(f"local SLURM cluster up in {time.time() - t0:.1f}s under {root}")
    try:
        yield LocalSlurm(root, Path(conf))
    finally:
        subprocess.run([str(CLUSTER / "slurm_down.sh"), str(root)], capture_output=True, timeout=300)


def _shm_in_use() -> set[str]:
    """Names under /dev/shm that a live process has mapped or open."""
    used: set[str] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for line in (proc / "maps").read_text().splitlines():
                if "/dev/shm/" in line:
                    used.add(line.split("/dev/shm/", 1)[1].split(" ")[0])
            for fd in (proc / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("/dev/shm/"):
                    used.add(target[len("/dev/shm/"):].split(" ")[0])
        except OSError:
            continue
    return used


@pytest.fixture(autouse=True)
def _free_leaked_deepspeed_shm() -> Iterator[None]:
    """After each test, unlink DeepSpeed CPU all-reduce buffers that no live process uses and
    that are older than a few seconds (a rank that is just creating one has it open)."""
    yield
    if not SHM.is_dir():
        return
    leaked = [p for p in SHM.glob(SHM_PREFIX + "*")]
    if not leaked:
        return
    used, now = _shm_in_use(), time.time()
    for path in leaked:
        try:
            if path.name not in used and now - path.stat().st_mtime > 5:
                path.unlink()
        except OSError:
            continue
