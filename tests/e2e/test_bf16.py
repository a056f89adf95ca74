"""bf16 end to end on 2 CPU ranks through the real ``deepspeed`` launcher: both tiny models train
(RDT under ZeRO-3, dense under ZeRO-2), a checkpoint resumes bit-identically, the NaN guard
catches an inf raised *inside* the forward (in the RDT's looped core) and skips the update, and
``mythos-export`` gives fp32 weights that are the master copy of the run's bf16 model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_utils import REPO, metrics, run_training, train_losses

from mythos.run_dir import list_tags

pytestmark = pytest.mark.slow

RDT = "configs/run/rdt-tiny-cpu.yaml"
DENSE = "configs/run/dense-tiny-cpu.yaml"
BF16 = ["deepspeed.precision=bf16", "model.loops.mean=3"]
ZERO3 = "deepspeed.config=configs/deepspeed/zero3.yaml"


@pytest.fixture(scope="module")
def shards(data_corpus) -> Path:
    return data_corpus.shards_dir


@pytest.fixture(scope="module")
def rdt_zero3(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("bf16") / "rdt"
    run_training(RDT, run, shards, [*BF16, ZERO3, "train.max_steps=6", "train.save_interval=3", "train.keep_last=5"])
    return run


def _export(tag: Path, out: Path) -> Path:
    proc = subprocess.run([sys.executable, "-m", "mythos.tools.export", "--checkpoint", str(tag), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def test_rdt_zero3_bf16_trains_and_resumes_bit_identically(rdt_zero3: Path, shards: Path, tmp_path: Path) -> None:
    info = json.loads((rdt_zero3 / "run_info.json").read_text())
    ds = json.loads((rdt_zero3 / "ds_config.json").read_text())
    assert info["bf16"] and info["zero_stage"] == 3 and ds["bf16"]["enabled"]
    ref = train_losses(rdt_zero3)
    assert len(ref) == 6 and all(0 < v < 10 for v in ref.values()) and ref[6] < ref[1]
    # the same command in a run dir holding only the step-3 checkpoint continues exactly
    run = tmp_path / "resumed"
    shutil.copytree(rdt_zero3 / "checkpoints" / "step0000003", run / "checkpoints" / "step0000003")
    proc = run_training(RDT, run, shards, [*BF16, ZERO3, "train.max_steps=6", "train.save_interval=3",
                                           "train.keep_last=5"])
    assert "resumed from" in proc.stdout
    assert train_losses(run) == {s: v for s, v in ref.items() if s > 3}  # bit-identical in bf16


def test_export_of_bf16_zero3_rdt_is_the_runs_model(rdt_zero3: Path, shards: Path, tmp_path: Path) -> None:
    """The exported fp32 weights, cast to bf16, reproduce the run's own bf16 validation loss (so
    they are the master weights of the model the run evaluated), and in fp32 they agree with it
    to bf16 tolerance."""
    from mythos.data import build_val_loader
    from mythos.train.config import load_run_config
    from mythos.train.evaluate import evaluate
    from mythos.weights import load_consolidated

    model = load_consolidated(_export(rdt_zero3 / "checkpoints" / "step0000006", tmp_path / "out")).eval()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    cfg = load_run_config(rdt_zero3 / "config.resolved.yaml")
    logged = [m for m in metrics(rdt_zero3) if "val/loss" in m][-1]
    assert logged["step"] == 6

    def val_losses(module: torch.nn.Module) -> dict[str, float]:
        # the run's eval: 2 ranks x train.eval_batches of the val split; token sums over both ranks
        parts = [evaluate(module, lambda r=r: iter(build_val_loader(cfg.data, cfg.train.micro_batch_size, r, 2)),
                          cfg.model, torch.device("cpu"), loops=cfg.train.eval_loops,
                          max_batches=cfg.train.eval_batches) for r in range(2)]
        return {k: sum(p[k] * p["val/tokens"] for p in parts) / sum(p["val/tokens"] for p in parts)
                for k in parts[0] if k.startswith("val/loss")}

    fp32 = val_losses(model)
    bf16 = val_losses(load_consolidated(tmp_path / "out").to(torch.bfloat16).eval())
    keys = [k for k in logged if k.startswith("val/loss")]
    assert len(keys) >= 3  # default depth and eval_loops [1, 2]
    for k in keys:
        # measured: 0.0 (the same bf16 weights, the same kernels) and 3e-4..4.4e-4 (bf16 vs fp32 math)
        assert abs(bf16[k] - logged[k]) < 1e-5, (k, bf16[k], logged[k])
        assert abs(fp32[k] - logged[k]) < 5e-3, (k, fp32[k], logged[k])


def test_dense_zero2_bf16_export_matches_the_bf16_module(shards: Path, tmp_path: Path) -> None:
    """ZeRO-2 keeps the bf16 module weights in the checkpoint: the export is their fp32 master
    (casting it back gives them bit for bit) and its logits match the bf16 model's."""
    from mythos.ds_checkpoint import clean_state_dict
    from mythos.weights import load_consolidated

    run = tmp_path / "dense"
    run_training(DENSE, run, shards, [*BF16, "train.max_steps=4"])
    losses = train_losses(run)
    assert len(losses) == 4 and losses[4] < losses[1]
    tag = run / "checkpoints" / "step0000004"
    fp32 = load_consolidated(_export(tag, tmp_path / "out")).eval()
    module = torch.load(tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    module = clean_state_dict(module)
    assert all(v.dtype == torch.bfloat16 for v in module.values())
    state = fp32.state_dict()
    for name, value in module.items():
        assert state[name].dtype == torch.float32
        assert torch.equal(state[name].to(torch.bfloat16), value), name
    assert any(not torch.equal(state[n], module[n].float()) for n in module)  # fp32 holds more than bf16 does
    lowp = load_consolidated(tmp_path / "out").eval()
    lowp.load_state_dict(module)
    lowp = lowp.to(torch.bfloat16)
    ids = torch.randint(0, 1024, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = lowp(ids).logits.float(), fp32(ids).logits
    # bf16 keeps 8 mantissa bits (relative 2^-9 per rounding); measured max |diff| 6.7e-3 on
    # logits up to 1.5 in size
    torch.testing.assert_close(got, ref, rtol=1e-2, atol=2e-2)


def test_nan_guard_catches_an_inf_inside_the_bf16_forward(shards: Path, tmp_path: Path) -> None:
    """RDT, ZeRO-2, bf16: an inf appears in rank 0's looped core at steps 2 and 3. Both steps are
    flagged and their updates skipped (weights after step 3 == after step 1), training goes on."""
    run = tmp_path / "inf"
    run_training(RDT, run, shards, [*BF16, "train.max_steps=4", "train.save_interval=1", "train.keep_last=8",
                                    "train.inject_inf_forward_steps=[2,3]", "train.max_bad_steps=3"])
    m = {r["step"]: r for r in metrics(run) if "train/loss" in r}
    assert m[1]["train/bad_steps"] == 0 and m[3]["train/bad_steps"] == 2 and m[3]["train/skipped_updates"] == 2
    assert m[2]["train/loss"] != m[2]["train/loss"]  # the step's loss really was non-finite
    assert m[4]["train/bad_steps"] == 2 and m[4]["train/loss"] == m[4]["train/loss"]  # step 4 is clean again
    tags = dict(list_tags(run / "checkpoints"))
    w1, w3, w4 = (_weights(tags[s]) for s in (1, 3, 4))
    assert all(torch.equal(w1[k], w3[k]) for k in w1)  # bad updates skipped
    assert not all(torch.equal(w3[k], w4[k]) for k in w3)  # the good step updated


def _weights(tag_dir: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
