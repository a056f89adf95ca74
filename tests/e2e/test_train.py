"""End-to-end pretraining through the real ``deepspeed`` launcher with 2 CPU ranks (gloo):
ZeRO-2 and ZeRO-3, loop checkpointing under ZeRO-3, exact resume after SIGKILL, signal-agreed
saves, tensorboard, identical data fingerprints, the NaN guard and config guards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from train_utils import (
    kill_group,
    metrics,
    rank_pids,
    run_training,
    start_training,
    train_losses,
    val_loss_of,
    wait_for_step,
)

from mythos.run_dir import is_complete, list_tags
from mythos.tools.compare import summarize
from mythos.tools.runs import load_run

pytestmark = pytest.mark.slow

RDT = "configs/run/rdt-tiny-cpu.yaml"
DENSE = "configs/run/dense-tiny-cpu.yaml"


@pytest.fixture(scope="module")
def shards(data_corpus) -> Path:
    return data_corpus.shards_dir


@pytest.fixture(scope="module")
def zero2_runs(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The dense and the RDT arm, 4 steps each, ZeRO-2, identical data config, through the
    ``deepspeed`` launcher (the command users run)."""
    root = tmp_path_factory.mktemp("zero2")
    runs = {}
    for name, config in (("dense", DENSE), ("rdt", RDT)):
        runs[name] = root / name
        run_training(config, runs[name], shards, ["train.max_steps=4", "train.save_interval=2"], launcher="deepspeed")
    return runs


def test_zero2_runs_write_everything_a_user_needs(zero2_runs: dict[str, Path]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for name, run in zero2_runs.items():
        info = json.loads((run / "run_info.json").read_text())
        assert info["world_size"] == 2 and info["zero_stage"] == 2 and info["kind"] == name
        assert (run / "config.resolved.yaml").is_file() and (run / "ds_config.json").is_file()
        ds = json.loads((run / "ds_config.json").read_text())
        assert ds["train_batch_size"] == 8 and ds["gradient_accumulation_steps"] == 2
        assert [s for s, _ in list_tags(run / "checkpoints")] == [2, 4]
        acc = EventAccumulator(str(run / "tensorboard"))
        acc.Reload()
        tags = acc.Tags()["scalars"]
        for tag in ("train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_s", "train/flops", "val/loss"):
            assert tag in tags, (name, tag)
        assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]
        losses = [e.value for e in acc.Scalars("train/loss")]
        assert all(0 < v < 10 for v in losses)
        if name == "rdt":
            assert "rdt/spectral_radius" in tags
            assert "val/loss@1" in tags and "val/loss@2" in tags and "rdt/loops_mean" in tags


def test_logged_spectral_radius_is_the_checkpointed_injections(zero2_runs: dict[str, Path]) -> None:
    """``rdt/spectral_radius`` logged at steps 2 and 4 is the spectral radius of the LTI injection
    in the (consolidated) checkpoints of those steps -- recomputed here from A_log / dt_bias both
    through ``LTIInjection.spectral_radius`` and by the formula ``max exp(-softplus(dt) e^A_log)``
    -- it moved between the two steps, and it is below 1."""
    from mythos.model.injection import LTIInjection

    run = zero2_runs["rdt"]
    logged = {m["step"]: m["rdt/spectral_radius"] for m in metrics(run) if "rdt/spectral_radius" in m}
    tags = dict(list_tags(run / "checkpoints"))
    for step in (2, 4):
        w = _weights(tags[step])
        a_log, dt_bias = w["injection.A_log"], w["injection.dt_bias"]
        inj = LTIInjection(a_log.numel(), 0.5)
        inj.load_state_dict({k.removeprefix("injection."): v for k, v in w.items() if k.startswith("injection.")})
        assert logged[step] == float(inj.spectral_radius()), step
        by_formula = float(torch.exp(-torch.nn.functional.softplus(dt_bias.double()) * a_log.double().exp()).max())
        assert logged[step] == pytest.approx(by_formula, rel=1e-6), step
        assert 0 < logged[step] < 1
    assert logged[2] != logged[4]  # the injection trained: this is not the init value read twice


def test_both_arms_consume_identical_data(zero2_runs: dict[str, Path]) -> None:
    a, b = (json.loads((zero2_runs[k] / "run_info.json").read_text()) for k in ("dense", "rdt"))
    assert a["data_fingerprint"] == b["data_fingerprint"] and a["data_hash"] == b["data_hash"]
    assert a["tokens_per_step"] == b["tokens_per_step"]
    ta, tb = ([m for m in metrics(zero2_runs[k]) if "train/tokens" in m][-1] for k in ("dense", "rdt"))
    assert ta["train/tokens"] == tb["train/tokens"]


def test_dataloader_workers_change_nothing(zero2_runs: dict[str, Path], shards: Path, tmp_path: Path) -> None:
    """data.num_workers=2 gives the RDT bit-identical losses (same samples, and the workers do not
    consume the trainer's RNG, which drives the RDT's h0 noise)."""
    run_training(RDT, tmp_path / "workers", shards, ["train.max_steps=4", "train.save_interval=2",
                                                     "data.num_workers=2"])
    assert train_losses(tmp_path / "workers") == train_losses(zero2_runs["rdt"])


def test_export_of_two_rank_zero_checkpoints(zero2_runs: dict[str, Path], tmp_path: Path) -> None:
    """`mythos-export` of a real 2-rank ZeRO-2 checkpoint gives the model the run trained:
    its val loss (recomputed here from the exported weights) is the val loss the *live* run logged
    at that step -- an independent path, not DeepSpeed's consolidation compared with itself. The
    dense arm also exports to Hugging Face Llama with matching logits."""
    from train_utils import REPO

    from mythos.weights import load_consolidated

    models = {}
    for name, run in zero2_runs.items():
        tag = run / "checkpoints" / "step0000004"
        out = tmp_path / name
        subprocess.run([sys.executable, "-m", "mythos.tools.export", "--checkpoint", str(tag), "--out", str(out)],
                       cwd=REPO, check=True, capture_output=True, timeout=300)
        models[name] = load_consolidated(out).eval()
        logged = {m["step"]: m["val/loss"] for m in metrics(run) if "val/loss" in m}
        assert val_loss_of(models[name], run) == pytest.approx(logged[4], abs=2e-6), name
    transformers = pytest.importorskip("transformers")
    hf_dir = tmp_path / "hf"
    subprocess.run([sys.executable, "-m", "mythos.tools.export", "--checkpoint",
                    str(zero2_runs["dense"] / "checkpoints" / "step0000004"), "--out", str(hf_dir), "--hf-llama"],
                   cwd=REPO, check=True, capture_output=True, timeout=300)
    hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir).eval()
    ids = torch.randint(0, 1024, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, models["dense"](ids).logits, rtol=1e-4, atol=1e-4)


def test_zero3_looped_block_with_varying_loops_and_checkpointing(shards: Path, tmp_path: Path) -> None:
    """ZeRO-3 with a core that runs a different (sampled) T every step: per-iteration activation
    checkpointing must give exactly the losses of no checkpointing."""
    common = ["deepspeed.config=configs/deepspeed/zero3.yaml", "train.max_steps=4", "model.loops.mean=3"]
    run_training(RDT, tmp_path / "plain", shards, common)
    run_training(RDT, tmp_path / "ckpt", shards, [*common, "model.checkpoint_loops=true",
                                                   "model.checkpoint_layers=true"])
    plain, ck = train_losses(tmp_path / "plain"), train_losses(tmp_path / "ckpt")
    assert len(plain) == 4 and plain == ck
    loops = [m["rdt/loops_max"] for m in metrics(tmp_path / "plain") if "rdt/loops_max" in m]
    assert len(set(loops)) > 1  # T really varied between steps


def test_exact_resume_after_sigkill_and_signal(shards: Path, tmp_path: Path) -> None:
    """Uninterrupted run vs. the same run SIGKILLed, resumed, stopped by SIGUSR1 on ONE rank,
    and resumed again: the per-step losses are bit-identical."""
    args = ["train.max_steps=20", "train.save_interval=3", "train.eval_interval=3"]
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    run_training(RDT, ref_dir, shards, args)
    ref = train_losses(ref_dir)

    proc = start_training(RDT, run_dir, shards, args)
    wait_for_step(run_dir, 5, proc)  # checkpoint 3 is complete, step 5 logged
    kill_group(proc, signal.SIGKILL)
    assert [s for s, _ in list_tags(run_dir / "checkpoints")][-1] in (3, 6)

    proc = start_training(RDT, run_dir, shards, args)
    wait_for_step(run_dir, 7, proc)
    os.kill(rank_pids(run_dir)[1], signal.SIGUSR1)  # only rank 1 hears it; both must save the same step
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "stopping on signal" in out
    # it really resumed (a trainer that ignored its checkpoints would reproduce the same losses)
    resumed = [ln for ln in out.splitlines() if "resumed from" in ln]
    assert len(resumed) == 1 and resumed[0].rstrip().endswith(("at step 3", "at step 6")), resumed
    assert json.loads((run_dir / "run_info.json").read_text())["resumed_from"].endswith(("step0000003", "step0000006"))
    saved = list_tags(run_dir / "checkpoints")[-1]
    assert 7 <= saved[0] < 20 and is_complete(saved[1])

    last = run_training(RDT, run_dir, shards, args)
    assert f"resumed from {saved[1]} at step {saved[0]}" in last.stdout
    assert train_losses(run_dir) == ref
    # the resumed segments never duplicate a step in metrics.jsonl
    steps = [m["step"] for m in metrics(run_dir) if "train/loss" in m]
    assert steps == sorted(set(steps))
    vals = {m["step"]: m["val/loss"] for m in metrics(run_dir) if "val/loss" in m}
    assert vals == {m["step"]: m["val/loss"] for m in metrics(ref_dir) if "val/loss" in m}
    # provenance keeps every segment (issue 24: wall time after a resume covered the last one only)
    info = json.loads((run_dir / "run_info.json").read_text())
    segs = info["segments"]
    assert [s["start_step"] for s in segs] == [0, int(resumed[0].rsplit(" ", 1)[1]), saved[0]], segs
    assert segs[0]["end_step"] in (3, 6)  # SIGKILLed: its end is its last checkpoint
    assert [s["end_step"] for s in segs[1:]] == [saved[0], 20] and all(s["world_size"] == 2 for s in segs)
    assert info["start_time"] == segs[0]["start_time"] < segs[1]["start_time"] < segs[2]["start_time"]
    summary = summarize(load_run(run_dir))
    assert summary["segments"] == 3
    assert summary["wall_s"] == pytest.approx(sum(s["end_time"] - s["start_time"] for s in segs))


def test_gradient_accumulation_is_token_weighted(data_corpus, tmp_path: Path) -> None:
    """Same global batch as 2 ranks x 2 micro x accum 2 and as 2 ranks x 4 micro x accum 1, on
    loss-masked samples whose micro-batches hold *different* numbers of label tokens: the step
    losses and the gradient norms agree. (With equal token counts a per-micro-batch mean would
    pass too, and AdamW hides a wrong overall scale in the loss; the gradient norm does not.)"""
    from mythos.data.shard_writer import write_example_shards

    g = np.random.default_rng(0)
    rows = []
    for _ in range(96):
        n = int(g.integers(12, 64))
        answer = int(g.integers(1, n - 2))  # 1 .. n-3 label tokens: very unequal per sample
        rows.append((g.integers(4, 1000, n).tolist(), [0] * (n - answer) + [1] * answer))
    shards = tmp_path / "masked"
    write_example_shards(shards, data_corpus.tokenizer_model, {"train": rows, "val": rows[:16]}, seq_len=64)
    args = ["train.max_steps=4", "data.shuffle=false"]
    run_training(DENSE, tmp_path / "acc2", shards, args)
    run_training(DENSE, tmp_path / "acc1", shards, [*args, "train.micro_batch_size=4"])
    a, b = metrics(tmp_path / "acc2"), metrics(tmp_path / "acc1")
    la, lb = ({m["step"]: (m["train/loss"], m["train/grad_norm"]) for m in x if "train/loss" in m} for x in (a, b))
    assert la.keys() == lb.keys() == {1, 2, 3, 4}
    for s in la:
        assert la[s][0] == pytest.approx(lb[s][0], abs=1e-5), (s, la[s], lb[s])
        assert la[s][1] == pytest.approx(lb[s][1], rel=1e-5), (s, la[s], lb[s])


def test_nan_guard_skips_updates_then_stops(shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "nan"
    proc = run_training(
        DENSE, run, shards,
        ["train.max_steps=8", "train.save_interval=1", "train.keep_last=8", "train.inject_nan_steps=[1,3,4,5]",
         "train.max_bad_steps=3"],
        check=False, launcher="deepspeed",  # torchrun reports a failed rank as exit 1; deepspeed passes 3 on
    )
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-2000:]
    err = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert err and "3 consecutive steps with a non-finite loss" in err[0] and "step0000004" in err[0]
    m = {r["step"]: r for r in metrics(run) if "train/loss" in r}
    assert m[1]["train/bad_steps"] == 1 and m[2]["train/bad_steps"] == 1
    assert m[2]["train/loss"] == m[2]["train/loss"] and m[2]["train/skipped_updates"] == 1  # finite
    assert m[5]["train/bad_steps"] == 4 and m[5]["train/skipped_updates"] == 4
    # the updates of bad steps were skipped: weights after step 2 (good) == after steps 3, 4 (bad)
    tags = dict(list_tags(run / "checkpoints"))
    assert max(tags) == 4
    w2, w4 = _weights(tags[2]), _weights(tags[4])
    assert all(torch.equal(w2[k], w4[k]) for k in w2)
    w1 = _weights(tags[1])
    assert not all(torch.equal(w1[k], w2[k]) for k in w1)  # good step 2 did update


def _weights(tag_dir: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)


def test_muon_under_zero2_trains(shards: Path, tmp_path: Path) -> None:
    run_training(RDT, tmp_path / "muon", shards, ["train.max_steps=6", "optim.name=muon", "optim.lr=3e-3"])
    losses = list(train_losses(tmp_path / "muon").values())
    assert len(losses) == 6 and losses[-1] < losses[0]


_MUON_PROBE = """
import json, sys
import deepspeed
import deepspeed.comm.torch as ds_torch
from mythos import build_model
from mythos.train.config import load_run_config
from mythos.train.ds_config import build_ds_config
from mythos.train.engine import build_engine

ds_torch.build_shm_op = lambda: None  # skip JIT-compiling DeepSpeed's CPU shm op
deepspeed.init_distributed(dist_backend="gloo")
cfg = load_run_config(sys.argv[1], sys.argv[2:])
engine = build_engine(build_model(cfg.model), cfg.optim, build_ds_config(cfg, 1, False))
names = {id(p): n for n, p in engine.module.named_parameters()}
opt = engine.optimizer  # ZeRO-2 wraps DeepSpeed's MuonWithAuxAdam; bit16_groups[i] <-> its param_groups[i]
print(json.dumps({
    "zero": type(opt).__name__, "inner": type(opt.optimizer).__name__,
    "tags": {n: bool(p.use_muon) for n, p in engine.module.named_parameters()},
    "groups": [{"use_muon": bool(g["use_muon"]), "params": [names[id(p)] for p in ps]}
               for g, ps in zip(opt.optimizer.param_groups, opt.bit16_groups)],
}))
"""


def test_muon_under_zero2_puts_only_weight_matrices_on_muon(tmp_path: Path) -> None:
    """The engine the trainer builds (``build_engine``, ZeRO-2, 1 gloo rank): every parameter's
    ``use_muon`` and the Muon / AdamW optimizer groups DeepSpeed built from them are exactly
    ``muon_eligible`` -- the LTI injection's B and the readout C (2-D, which DeepSpeed's name-based
    tagging would put on Muon) and the LoRA banks stay on AdamW."""
    from train_utils import REPO, TINY, ds_env, free_port

    from mythos import build_model
    from mythos.train.config import load_run_config
    from mythos.train.optim import muon_eligible

    script = tmp_path / "probe.py"
    script.write_text(_MUON_PROBE)
    args = [RDT, *TINY, "train.global_batch_size=2", "optim.name=muon", "model.lora.rank=2"]
    env = {**ds_env(), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    proc = subprocess.run([sys.executable, str(script), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    want = muon_eligible(build_model(load_run_config(args[0], args[1:]).model, device="meta"))
    assert got["zero"] == "DeepSpeedZeroOptimizer" and got["inner"] == "MuonWithAuxAdam"
    assert got["tags"] == want
    on_muon = {n for g in got["groups"] if g["use_muon"] for n in g["params"]}
    on_adam = {n for g in got["groups"] if not g["use_muon"] for n in g["params"]}
    assert on_muon == {n for n, e in want.items() if e} and on_adam == {n for n, e in want.items() if not e}
    for name in ("injection.B.weight", "readout.weight", "core.0.attn.q_proj.lora_A", "embed.weight"):
        assert name in on_adam, name
    assert "core.0.attn.q_proj.weight" in on_muon


# ------------------------------------------------------------------ fast guards (no launcher)
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.global_batch_size=7", "global batch size 7 is not divisible by world size 2"),
        ("model.vocab_size=100", "model.vocab_size=100 is smaller than the tokenizer's vocab 1024"),
        ("model.max_seq_len=32", "shards hold sequences of 64 tokens but model.max_seq_len=32"),
        ("train.max_steps=100000", "the data runs out"),
        ("train.bogus=1", "unknown config key 'train.bogus'"),
        ("optim.name=muon", "optim.name=muon needs ZeRO stage >= 1"),
    ],
)
def test_config_guards_fail_before_any_process_group(shards: Path, override: str, message: str, capsys,
                                                     monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from train_utils import REPO, TINY

    sys.path.insert(0, str(REPO / "launch"))
    import pretrain

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    extra = ["deepspeed.config=configs/deepspeed/zero0.yaml"] if "muon" in override else []
    code = pretrain.main(["--config", DENSE, f"run_dir={tmp_path}", f"data.shards={shards}", *TINY, *extra, override])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "checkpoints").exists()


def test_missing_config_file_is_one_line(tmp_path: Path) -> None:
    from train_utils import REPO, ds_env

    proc = subprocess.run(
        [sys.executable, "launch/pretrain.py", "--config", "configs/run/nope.yaml"], cwd=REPO, env=ds_env(),
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: config not found: 'configs/run/nope.yaml'")
