"""``--dry-run``: the resolved config, derived DeepSpeed config, plan and every check's verdict;
exit 0 when all pass, 2 with the failing check's one line; nothing is started or written.
(The resume verdicts on a real checkpoint are in test_wandb.py, which has a run to resume.)"""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from train_utils import REPO, TINY, unwritable

from mythos.train.dryrun import dry_run

DENSE = "configs/run/dense-tiny-cpu.yaml"


def _args(run: Path, shards: Path, *extra: str) -> list[str]:
    return [f"run_dir={run}", f"data.shards={shards}", *TINY, "train.max_steps=20", *extra]


def test_all_checks_pass_prints_everything_and_starts_nothing(data_corpus, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    assert dry_run(DENSE, _args(run, data_corpus.shards_dir), gpus=2, peak_tflops=100.0, mfu=0.5) == 0
    out = capsys.readouterr().out
    for part in ("== resolved run config", "name: dense-tiny-cpu", "== derived DeepSpeed config (2 ranks",
                 '"train_batch_size": 8', '"gradient_accumulation_steps": 2', "== plan",
                 "20 x 8 samples x 64 tokens", "model FLOPs", "hw FLOPs", "at MFU 0.5 of 100 TFLOP/s",
                 "ok   world size  2 ranks x micro batch 2 x 2", "ok   data", "sizes + sha256 ok", "ok   fit",
                 "ok   resume      fresh start", "ok   wandb       disabled", "all checks pass"):
        assert part in out, part
    assert not run.exists()  # no run dir, no process group, nothing written


@pytest.mark.parametrize("case", ["geometry", "vocab", "corrupt_shard", "wandb_missing", "bad_key", "run_dir_file",
                                  "run_dir_read_only"])
def test_a_failing_check_is_exit_2_with_its_line(case: str, data_corpus, tmp_path: Path, capsys,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    shards, extra, gpus = data_corpus.shards_dir, [], 2
    if case == "geometry":
        gpus = 3
    elif case == "vocab":
        extra = ["model.vocab_size=256"]
    elif case == "corrupt_shard":
        shards = tmp_path / "shards"
        shutil.copytree(data_corpus.shards_dir, shards)
        victim = sorted(shards.glob("train-*.tar"))[0]
        victim.write_bytes(victim.read_bytes()[:-512])
    elif case == "wandb_missing":
        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
        extra = ["log.wandb.mode=offline"]
    elif case == "bad_key":
        extra = ["train.max_stpes=3"]
    run = tmp_path / "run"
    if case == "run_dir_file":
        run.write_text("not a directory")
    with unwritable(tmp_path / "ro") if case == "run_dir_read_only" else contextlib.nullcontext():
        if case == "run_dir_read_only":
            run = tmp_path / "ro" / "run"
        code = dry_run(DENSE, _args(run, shards, *extra), gpus=gpus)
        cap = capsys.readouterr()
        if case.startswith("run_dir"):  # the launch's start-up refuses it the same way, before a process group
            from mythos.train.cli import main

            launch_code = main(["--config", DENSE, *_args(run, shards)])
            launch_err = capsys.readouterr().err
    assert code == 2
    err = cap.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), cap.err
    expect = {
        "geometry": ("error: world size: global batch size 8 is not divisible by world size 3", "FAIL world size"),
        "vocab": ("error: fit: model.vocab_size=256 is smaller than the tokenizer's vocab", "FAIL fit"),
        "corrupt_shard": ("error: data: shard ", "skip fit"),
        "wandb_missing": ("error: wandb: log.wandb.mode=offline needs the wandb package: pip install wandb",
                          "FAIL wandb"),
        "bad_key": ("error: config: ", "FAIL config"),
        "run_dir_file": (f"error: run dir: run_dir {run} is a file, not a directory", "FAIL run dir"),
        "run_dir_read_only": (f"error: run dir: run_dir {run} is not writable", "FAIL run dir"),
    }[case]
    assert err[0].startswith(expect[0]) and expect[1] in cap.out, (err, cap.out)
    if case.startswith("run_dir"):
        assert launch_code == 2 and launch_err.splitlines() == [err[0].replace("run dir: ", "", 1)], launch_err


def test_cli_dry_run_through_the_launch_wrapper(data_corpus, tmp_path: Path) -> None:
    """``launch/pretrain.py --dry-run`` (the same main as ``python -m mythos.train``): exit 2 and
    one stderr line, without a launcher or a process group."""
    proc = subprocess.run([sys.executable, "launch/pretrain.py", "--config", DENSE, "--dry-run", "--gpus", "3",
                           *_args(tmp_path / "run", data_corpus.shards_dir)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")] == [
        "error: world size: global batch size 8 is not divisible by world size 3; choose a batch size that is a "
        "multiple of the number of ranks"]
    assert "== checks" in proc.stdout and "ok   data" in proc.stdout
