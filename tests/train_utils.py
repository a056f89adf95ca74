"""Helpers for the end-to-end training tests: launch ``launch/pretrain.py`` with 2 CPU ranks
(gloo) and read back what a run wrote.

Two launchers, both real: ``torchrun`` (the default here) and DeepSpeed's ``deepspeed`` launcher
(``launcher="deepspeed"``). Training is the same either way -- both set the one env contract
(RANK / LOCAL_RANK / WORLD_SIZE / MASTER_*) that :mod:`mythos.dist` reads -- but DeepSpeed's
launcher imports deepspeed twice before it spawns a rank: a 1-step run took 10.7 s through it and
6.7 s through torchrun on an idle 2-core machine (24.6 s vs 10.2 s with the suite running). The
DeepSpeed launcher stays on the paths users take it for: the session runs (conftest
``short_runs``), test_train's ZeRO-2 pair, every signal / preemption test (``start_training``),
the runs whose exit code is the claim (torchrun reports any failed rank as 1), the GPU test and
``make demo``."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

#: A model small enough that a 2-rank step takes well under a second on 2 cores.
TINY = [
    "model.vocab_size=1024", "model.d_model=64", "model.n_heads=2", "model.mlp_hidden=128",
    "model.max_seq_len=64", "train.global_batch_size=8", "train.micro_batch_size=2",
    "train.log_interval=1", "train.eval_interval=0", "train.eval_batches=2", "train.eval_loops=[1,2]",
    "train.dist_timeout_s=120", "optim.warmup_steps=2",
]


def ds_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        # one shared extensions dir: only the first launch compiles DeepSpeed's shm op
        TORCH_EXTENSIONS_DIR=env.get("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "mythos-torch-ext")),
    )
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_cmd(config: str, run_dir: Path, shards: Path, overrides: list[str], nproc: int = 2,
               launcher: str = "torchrun") -> list[str]:
    """The command line of a ``nproc``-rank run through ``launcher`` (``torchrun`` | ``deepspeed``)."""
    port = str(free_port())
    if launcher == "deepspeed":
        head = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--master_port", port]
    elif launcher == "torchrun":
        head = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", port]
    else:
        raise ValueError(f"launcher must be torchrun or deepspeed, got {launcher!r}")
    return [*head, "launch/pretrain.py", "--config", config, f"run_dir={run_dir}", f"data.shards={shards}", *TINY,
            *overrides]


def run_training(config: str, run_dir: Path, shards: Path, overrides: list[str] = (), *, nproc: int = 2,
                 timeout: float = 600, check: bool = True, launcher: str = "torchrun") -> subprocess.CompletedProcess:
    proc = subprocess.run(
        launch_cmd(config, run_dir, shards, list(overrides), nproc, launcher), cwd=REPO, env=ds_env(),
        capture_output=True, text=True, timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def start_training(config: str, run_dir: Path, shards: Path, overrides: list[str] = ()) -> subprocess.Popen:
    return subprocess.Popen(
        launch_cmd(config, run_dir, shards, list(overrides), launcher="deepspeed"), cwd=REPO, env=ds_env(),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []


def train_losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["train/loss"] for m in metrics(run_dir) if "train/loss" in m}


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Wait until *this* process has logged ``step`` (a file left by an earlier, killed run with
    higher steps does not count: the new run rewrites metrics.jsonl when it starts)."""
    started = time.time()
    deadline = started + timeout
    path = run_dir / "metrics.jsonl"
    while time.time() < deadline:
        fresh = path.exists() and path.stat().st_mtime >= started
        if fresh and max(train_losses(run_dir), default=0) >= step and len(rank_pids(run_dir)) == 2:
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited early ({proc.returncode}):\n{proc.stdout.read()[-4000:]}")
        time.sleep(0.2)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def rank_pids(run_dir: Path) -> dict[int, int]:
    """local rank -> pid of the training processes of this run (found via /proc cmdlines)."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in argv]
        if "launch/pretrain.py" in args and f"run_dir={run_dir}" in args:
            for a in args:
                if a.startswith("--local_rank="):
                    out[int(a.split("=")[1])] = int(d.name)
    return out


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    proc.wait(timeout=60)


def val_loss_of(model: torch.nn.Module, run: Path, world: int = 2, batches: int = 2, micro: int = 2) -> float:
    """The trainer's periodic eval recomputed in this process: each rank's first ``batches`` val
    batches (the run's ``train.eval_batches``), token-weighted over all ranks."""
    from mythos.data import build_val_loader
    from mythos.train.config import load_run_config

    cfg = load_run_config(run / "config.resolved.yaml")
    ce = tokens = 0.0
    with torch.no_grad():
        for rank in range(world):
            for i, batch in enumerate(build_val_loader(cfg.data, micro, rank, world)):
                if i == batches:
                    break
                out = model(batch["input_ids"], labels=batch["labels"])
                ce, tokens = ce + float(out.ce_sum), tokens + float(out.n_tokens)
    return ce / tokens


#: An offline lm-eval multiple-choice task over ``{data}/mc.jsonl`` (context, choices, label), as
#: a ``str.format`` template (``{data}``); prefix it with ``task: NAME``.
LM_EVAL_MC_TASK = """dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}/mc.jsonl}}}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list: [{{metric: acc}}]
"""


def _can_write(path: Path) -> bool:
    try:
        (path / ".probe").write_text("x")
    except OSError:
        return False
    (path / ".probe").unlink()
    return True


@contextlib.contextmanager
def unwritable(path: Path):
    """``path`` (a directory, created) made unwritable for this process for the ``with`` block:
    mode 0555, and for root (who ignores modes) the immutable attribute (``chattr +i``). Skips the
    test where neither works (then the refusal cannot be provoked here)."""
    import pytest

    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o555)
    immutable = False
    if _can_write(path):
        immutable = subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0
    try:
        if _can_write(path):
            pytest.skip(f"cannot make {path} unwritable here (root without chattr +i)")
        yield path
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(path)], capture_output=True)
        os.chmod(path, 0o755)


def random_model(preset: str, overrides: list[str], seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """A model (eval mode) whose every parameter is random and non-trivial: zero-init output
    projections, zero LoRA B / loop embeddings and unit norm gains would hide a dropped, swapped
    or misplaced term in an export or a port (matrices ~ N(0, std), vectors ~ N(0, 0.3), norm
    gains ~ U(0.5, 1.5))."""
    from mythos.model.build import build_model, load_model_config

    cfg = load_model_config(preset, [*overrides, "zero_init_out=false"])
    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif p.dim() >= 2:
                p.normal_(0.0, std)
            else:
                p.normal_(0.0, 0.3)
    return model.eval()
