"""``pip install .`` (a real wheel, not editable) gives working commands from any directory.

The wheel is built from a copy of the sources (the checkout's ``mythos.egg-info`` and ``build/``
stay untouched) and installed ``--no-deps`` into a fresh venv whose ``.pth`` file adds this venv's
site-packages, so torch/deepspeed are importable without reinstalling them, while ``mythos``
itself can only come from the wheel (the dev venv's editable finder lives behind a ``.pth`` file
in that directory, and ``.pth`` files in a ``.pth``-added directory are not processed). Everything
then runs from a temp cwd outside the checkout: the console commands' ``--help``, tokenizer and
shards from a small corpus, a 3-step 1-rank training through ``deepspeed --module mythos.train``
on a preset *name* (resolved from the wheel's package data), and an export of its checkpoint.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from train_utils import TINY, ds_env, free_port

REPO = Path(__file__).resolve().parents[2]
COMMANDS = ("mythos-train", "mythos-prep", "mythos-tokenizer", "mythos-eval", "mythos-export", "mythos-plan",
            "mythos-compare", "mythos-experiment-report", "mythos-accounting")
WORDS = ["the", "king", "queen", "sword", "crown", "river", "castle", "night", "morning", "speaks", "walks", "sees",
         "a", "of", "and", "to", "in", "with", "gold", "silver", "old", "young", "brave", "fair", "dark", "light"]

pytestmark = pytest.mark.slow


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd[:3]} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _corpus(path: Path, n_paragraphs: int = 1500) -> Path:
    rng = random.Random(0)
    paras = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))) + "." for _ in range(n_paragraphs)]
    path.write_text("\n\n".join(paras) + "\n")
    return path


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel installed (deps from this venv through a ``.pth`` line)."""
    root = tmp_path_factory.mktemp("install")
    src = root / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for d in ("mythos", "data_prep"):
        shutil.copytree(REPO / d, src / d, ignore=ignore)
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / f, src / f)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(root / "dist"),
          str(src)], cwd=root, env=env)
    (wheel,) = (root / "dist").glob("mythos-*.whl")
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=root, env=env)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    (site / "_dev_deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-deps", "-q",
          str(wheel)], cwd=root, env=env)
    return venv


def _env(venv: Path) -> dict[str, str]:
    env = {k: v for k, v in ds_env().items() if k != "PYTHONPATH"}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


def test_installed_commands_work_outside_the_checkout(venv: Path, tmp_path: Path) -> None:
    env, py = _env(venv), str(venv / "bin" / "python")
    where = _run([py, "-c", "import mythos, data_prep, mythos.config as c; print(mythos.__file__); "
                  "print(data_prep.__file__); print(c.resolve_config_path('rdt-tiny', kind='model'))"],
                 cwd=tmp_path, env=env).stdout.split()
    assert all(p.startswith(str(venv)) for p in where), where  # the wheel's copy, presets included

    # every console command starts (--help imports its module; all at once, they mostly wait on imports)
    procs = {c: subprocess.Popen([str(venv / "bin" / c), "--help"], cwd=tmp_path, env=env, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE) for c in COMMANDS}
    for c, p in procs.items():
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0 and "usage" in out, f"{c} --help: {p.returncode}\n{err[-2000:]}"

    # tokenizer + shards from a small corpus, by the installed commands
    corpus = _corpus(tmp_path / "corpus.txt")
    _run([str(venv / "bin" / "mythos-tokenizer"), "--input", str(corpus), "--vocab-size", "320", "--out", "tok"],
         cwd=tmp_path, env=env)
    _run([str(venv / "bin" / "mythos-prep"), "--tokenizer", "tok", "--input", str(corpus), "--out", "shards",
          "--seq-len", "64", "--workers", "1", "--shard-tokens", "16384", "--val-fraction", "0.05", "--no-progress"],
         cwd=tmp_path, env=env)
    assert (tmp_path / "shards" / "manifest.json").is_file()

    # 3 steps on 1 rank through the documented launcher form, a preset by name
    run = tmp_path / "run"
    overrides = [f"run_dir={run}", f"data.shards={tmp_path / 'shards'}", *TINY, "train.max_steps=3",
                 "train.save_interval=0", "train.eval_batches=1"]
    _run([py, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", str(free_port()),
          "--module", "mythos.train", "--config", "dense-tiny-cpu", *overrides], cwd=tmp_path, env=env, timeout=300)
    tags = sorted((run / "checkpoints").glob("step*"))
    assert tags and tags[-1].name == "step0000003", tags

    _run([str(venv / "bin" / "mythos-export"), "--checkpoint", str(tags[-1]), "--out", "export"],
         cwd=tmp_path, env=env, timeout=180)
    assert any((tmp_path / "export").glob("*.safetensors"))
