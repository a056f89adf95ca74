"""Does a refactor change behaviour? Run the same model cases and the same training run at two
revisions and compare what they wrote, byte for byte where bytes are deterministic.

    python bench/parity/compare_revisions.py --base e52504c          # this checkout vs e52504c
    python bench/parity/compare_revisions.py --base main --only train --keep /tmp/parity

1. **model**: ``model_cases.py`` (~430 RDT cases: every execution, option and exit) saved by each
   revision's mythos, compared with ``torch.equal`` (~35 s per revision on 2 cores).
2. **train**: the same 16-step 2-rank tiny RDT run (torchrun, gloo) at each revision, with a loss
   spike injected so the spike guard skips, rolls back and resumes, a val pass every 3 steps and a
   checkpoint every 4 (~15 s per revision). Compared: ``metrics.jsonl`` without ``time`` and
   ``perf/*`` (wall clock), ``consumed.jsonl``, ``rollbacks.json``, and every checkpoint file byte for byte -- except
   the per-rank RNG files, whose Python / NumPy states are drawn from the OS at process start (the
   torch states in them are compared), and the ``COMPLETE`` marker, which records those files'
   hashes and the save time.

The base revision is checked out with ``git worktree`` into a temporary directory (removed at the
end unless ``--keep``); each side runs with ``PYTHONPATH`` set to its own tree. The shards are a
small Shakespeare corpus built once (``data_prep.demo_corpus.build_test_corpus``) unless
``--shards`` names others. Exit status 0 only when every comparison is identical; the table names
each difference.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CASES = Path(__file__).resolve().parent / "model_cases.py"
TRAIN = ["--config", "configs/run/rdt-tiny-cpu.yaml",
         "model.vocab_size=1024", "model.d_model=64", "model.n_heads=2", "model.mlp_hidden=128",
         "model.max_seq_len=64", "train.global_batch_size=8", "train.micro_batch_size=2", "train.log_interval=1",
         "train.eval_interval=3", "train.eval_batches=2", "train.dist_timeout_s=120", "optim.warmup_steps=2",
         "train.spike.action=rollback", "train.spike.window=8", "train.spike.min_history=4", "train.spike.sigma=4",
         "train.spike.rollback_after=2", "train.spike.lr_factor=0.5", "train.inject_spike_batches=[6,10,11]",
         "train.save_interval=4", "train.keep_last=5", "train.max_steps=16"]
#: files whose bytes depend on the process (OS-seeded Python/NumPy RNG) or the clock
NONDETERMINISTIC = ("COMPLETE",)


def _env(tree: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                           "MASTER_PORT")}
    env.update(PYTHONPATH=str(tree), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: Sequence[str], tree: Path, log: Path) -> None:
    with log.open("w") as f:
        proc = subprocess.run(list(cmd), cwd=tree, env=_env(tree), stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"error: {' '.join(cmd[:4])} ... failed in {tree} (exit {proc.returncode}); "
                         f"log {log}:\n{tail}")


def model_side(tree: Path, out: Path) -> Path:
    """``model_cases.py save`` against ``tree``'s mythos."""
    path = out / "model_cases.pt"
    _run([sys.executable, str(CASES), "save", str(path)], tree, out / "model_cases.log")
    return path


def train_side(tree: Path, out: Path, shards: Path) -> Path:
    """The tiny spike-and-rollback run at ``tree``; returns its run directory."""
    run = out / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_port()),
           "launch/pretrain.py", *TRAIN, f"run_dir={run}", f"data.shards={shards}"]
    _run(cmd, tree, out / "train.log")
    return run


def _metrics(run: Path) -> list[dict]:
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return [{k: v for k, v in r.items() if k != "time" and not k.startswith("perf/")} for r in rows]


def _rng_torch_state(path: Path) -> dict:
    import torch

    state = torch.load(path, weights_only=False)
    # python_* / numpy_*: seeded from the OS at process start, so they differ between any two runs
    return {k: v for k, v in state.items() if not k.startswith(("python_", "numpy_"))}


def compare_runs(a: Path, b: Path) -> list[str]:
    """Differences between two runs' outputs (empty: identical where deterministic)."""
    import torch

    bad = []
    if _metrics(a) != _metrics(b):
        bad.append("metrics.jsonl (time and perf/* excluded)")
    for name in ("consumed.jsonl", "rollbacks.json"):
        fa, fb = a / name, b / name
        if fa.is_file() != fb.is_file() or (fa.is_file() and fa.read_bytes() != fb.read_bytes()):
            bad.append(name)
    ca, cb = a / "checkpoints", b / "checkpoints"
    files_a = sorted(p.relative_to(ca) for p in ca.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(cb) for p in cb.rglob("*") if p.is_file())
    if files_a != files_b:
        bad.append(f"checkpoint files differ: {sorted(set(map(str, files_a)) ^ set(map(str, files_b)))[:5]}")
    for rel in files_a:
        if rel.name in NONDETERMINISTIC or not (cb / rel).is_file():
            continue
        if rel.name.startswith("rng_rank"):
            ta, tb = _rng_torch_state(ca / rel), _rng_torch_state(cb / rel)
            if not (set(ta) == set(tb) and all(torch.equal(ta[k], tb[k]) if isinstance(ta[k], torch.Tensor)
                                               else ta[k] == tb[k] for k in ta)):
                bad.append(f"checkpoints/{rel} (torch RNG state)")
        elif (ca / rel).read_bytes() != (cb / rel).read_bytes():
            bad.append(f"checkpoints/{rel}")
    return bad


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="compare_revisions.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="git revision to compare this checkout against (required)")
    p.add_argument("--only", choices=("model", "train"), default=None,
                   help="run one of the two comparisons (default: both)")
    p.add_argument("--shards", type=Path, default=None,
                   help="shards for the training run (default: a small Shakespeare corpus built in the work dir)")
    p.add_argument("--keep", type=Path, default=None,
                   help="keep the work dir (both sides' outputs and logs) here (default: a removed temp dir)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    work = args.keep or Path(tempfile.mkdtemp(prefix="mythos-parity-"))
    work.mkdir(parents=True, exist_ok=True)
    base_tree = work / "base-tree"
    rev = subprocess.run(["git", "rev-parse", "--verify", f"{args.base}^{{commit}}"], cwd=REPO,
                         capture_output=True, text=True)
    if rev.returncode != 0:
        print(f"error: --base {args.base!r} is not a commit of {REPO}", file=sys.stderr)
        return 2
    subprocess.run(["git", "worktree", "add", "--detach", "--force", str(base_tree), rev.stdout.strip()], cwd=REPO,
                   check=True, capture_output=True)
    results: list[tuple[str, list[str]]] = []
    try:
        sides = {"base": base_tree, "head": REPO}
        if args.only in (None, "model"):
            saved = {name: model_side(tree, _mkdir(work / name)) for name, tree in sides.items()}
            proc = subprocess.run([sys.executable, str(CASES), "compare", str(saved["base"]), str(saved["head"])],
                                  cwd=REPO, env=_env(REPO), capture_output=True, text=True)
            print(proc.stdout.strip())
            results.append(("model cases", [] if proc.returncode == 0 else ["see the MISMATCH lines above"]))
        if args.only in (None, "train"):
            shards = args.shards or _test_shards(work / "corpus")
            runs = {name: train_side(tree, _mkdir(work / name), shards) for name, tree in sides.items()}
            results.append(("training run", compare_runs(runs["base"], runs["head"])))
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(base_tree)], cwd=REPO, capture_output=True)
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\n{args.base} vs this checkout")
    for what, bad in results:
        print(f"  {what:14s} {'identical' if not bad else 'DIFFERENT: ' + '; '.join(bad)}")
    return 0 if all(not bad for _, bad in results) else 1


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _test_shards(root: Path) -> Path:
    sys.path.insert(0, str(REPO))
    from data_prep.demo_corpus import build_test_corpus

    return build_test_corpus(root).shards_dir


if __name__ == "__main__":
    raise SystemExit(main())
