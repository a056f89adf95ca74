"""Distributed environment: one env contract (RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR /
MASTER_PORT) for the ``deepspeed`` launcher, ``torchrun`` and SLURM ``srun`` tasks alike.

Everything here is a no-op in a single process without a process group, so library code can call
``all_reduce_sum`` or ``barrier`` unconditionally.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_info() -> DistInfo:
    """Rank layout from the environment, readable *before* any process group exists (so configs
    can be validated against the world size first). SLURM variables are a fallback for ``srun``
    tasks started without our task wrapper."""
    env = os.environ
    rank = int(env.get("RANK", env.get("SLURM_PROCID", 0)))
    local = int(env.get("LOCAL_RANK", env.get("SLURM_LOCALID", 0)))
    world = int(env.get("WORLD_SIZE", env.get("SLURM_NTASKS", 1)))
    return DistInfo(rank, local, world)


def is_cuda() -> bool:
    return torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "") != "cpu"


def init_distributed(timeout_s: float = 600.0) -> DistInfo:
    """Initialise DeepSpeed's process group (NCCL on GPU, gloo on CPU) with a timeout, so a hung
    collective becomes an error instead of a silent stall. Single-process runs without the env
    get a one-rank gloo group on a loopback port, so the same code path runs everywhere."""
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    # DeepSpeed logs its whole config and every engine detail at INFO on every rank; mythos has
    # its own rank-0 console line, so keep DeepSpeed to warnings unless asked.
    ds_logger.setLevel(os.environ.get("MYTHOS_DS_LOG_LEVEL", "WARNING").upper())
    info = env_info()
    os.environ.setdefault("RANK", str(info.rank))
    os.environ.setdefault("LOCAL_RANK", str(info.local_rank))
    os.environ.setdefault("WORLD_SIZE", str(info.world_size))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    if is_cuda():
        torch.cuda.set_device(info.local_rank)
    deepspeed.init_distributed(
        dist_backend="nccl" if is_cuda() else "gloo",
        timeout=datetime.timedelta(seconds=timeout_s),
        auto_mpi_discovery=False,
    )
    return env_info()


def device() -> torch.device:
    return torch.device("cuda", env_info().local_rank) if is_cuda() else torch.device("cpu")


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum across ranks (identity without a process group); returns ``t``."""
    if initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def shutdown(exit_code: int = 1, grace_s: float | None = 15.0) -> None:
    """Error exit of a rank: destroy the process group, so that peers blocked in a collective fail
    now ("Connection closed by peer") rather than after the timeout, and guarantee that this
    process exits ``exit_code`` within ``grace_s`` even if teardown or interpreter shutdown hangs
    (a destroy that waits on a stuck peer, a child process that never joins). ``grace_s=None``
    arms no forced exit (a caller that is not the whole process, e.g. a test)."""

    def force_exit() -> None:  # a last resort: that it fired is itself a bug to look into
        print(f"warning: rank {env_info().rank} still running {grace_s:.0f}s after its error; forcing exit",
              file=sys.stderr, flush=True)
        os._exit(exit_code)

    if grace_s is not None:
        watchdog = threading.Timer(grace_s, force_exit)
        watchdog.daemon = True  # keeps running through interpreter shutdown; never delays a quick exit
        watchdog.start()
    if initialized():
        with contextlib.suppress(Exception):  # best effort on a path that is already failing
            dist.destroy_process_group()


def finish() -> None:
    """Normal end of a run on every rank: a barrier (no rank is still inside a collective), then
    destroy the process group. Without it the backend's worker threads outlive the interpreter, and
    a rank can abort at exit ("terminate called without an active exception", exit -6) after a run
    that succeeded -- seen once in ~40 two-rank launches of the test suite."""
    if initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if initialized() and dist.get_world_size() > 1:
        dist.barrier()
