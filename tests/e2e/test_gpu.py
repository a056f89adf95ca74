"""GPU acceptance (``-m gpu``; skipped without CUDA): a 1-GPU DeepSpeed bf16 run of both tiny
models with ``train.compile=true``, resumed from its middle checkpoint. Run by
``bench/gpu_check.sh`` together with the CUDA eval test (tests/test_eval.py) and bench/gpu_mfu.py.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from train_utils import REPO, ds_env, launch_cmd, metrics, train_losses

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CONFIGS = {"dense": "configs/run/dense-tiny-cpu.yaml", "rdt": "configs/run/rdt-tiny-cpu.yaml"}
ARGS = ["deepspeed.precision=bf16", "train.compile=true", "train.max_steps=6", "train.save_interval=3",
        "train.eval_interval=3"]


def _gpu_env() -> dict[str, str]:
    env = ds_env()
    env.pop("DS_ACCELERATOR", None)  # ds_env() pins DeepSpeed to the CPU accelerator
    env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    return env


def _train(config: str, run_dir: Path, shards: Path) -> None:
    proc = subprocess.run(launch_cmd(config, run_dir, shards, ARGS, nproc=1, launcher="deepspeed"), cwd=REPO,
                          env=_gpu_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_one_gpu_bf16_compiled_run_resumes(kind: str, data_corpus, tmp_path: Path) -> None:
    """Train 6 steps on one GPU in bf16 with compiled blocks; then continue a copy of the run from
    its step-3 checkpoint: steps 4-6 repeat the uninterrupted run's losses (to bf16 round-off: GPU
    kernels may reduce in a different order on a second launch) and the run writes MFU."""
    shards = data_corpus.shards_dir
    ref = tmp_path / "ref"
    _train(CONFIGS[kind], ref, shards)
    info = (ref / "run_info.json").read_text()
    assert '"bf16": true' in info
    assert any("perf/mfu" in m or "perf/hardware_tflops_per_device" in m for m in metrics(ref))

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(ref / "checkpoints" / "step0000003", resumed / "checkpoints" / "step0000003")
    _train(CONFIGS[kind], resumed, shards)
    a, b = train_losses(ref), train_losses(resumed)
    assert sorted(b) == [4, 5, 6], b
    for step in (4, 5, 6):
        assert b[step] == pytest.approx(a[step], rel=2e-3), (step, a[step], b[step])
