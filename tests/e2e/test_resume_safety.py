"""Resume safety: a corrupt newest checkpoint is reported, kept aside and skipped (the run goes
on from the previous one, bit-identically); a resume after a model or data change is refused with
one line; the ZeRO-0 NaN guard skips the update; our RNG files never unpickle code.

Fast tests use a fake engine (no launcher); ``slow`` ones launch real 2-rank runs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from train_utils import kill_group, metrics, run_training, start_training, train_losses, wait_for_step

from mythos.config import ConfigError
from mythos.run_dir import COMPLETE, list_tags
from mythos.train import checkpoint as ckpt
from mythos.train import reshard

RDT = "configs/run/rdt-tiny-cpu.yaml"
DENSE = "configs/run/dense-tiny-cpu.yaml"


class FakeEngine:
    """Writes and reads files the way DeepSpeed's engine does, without a model."""

    def save_checkpoint(self, root: str, tag: str, client_state: dict, save_latest: bool) -> None:
        d = Path(root) / tag
        d.mkdir(parents=True, exist_ok=True)
        (d / "mp_rank_00_model_states.pt").write_bytes(b"model" * 100 + tag.encode())
        (d / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"optim" * 100)

    def load_checkpoint(self, load_dir: str, tag: str) -> tuple[str, dict]:
        return str(Path(load_dir) / tag), {"step": 0}


def _save(root: Path, *steps: int, keep_last: int = 5) -> None:
    for s in steps:
        ckpt.save(FakeEngine(), root, s, {"model_hash": "m", "data_fingerprint": "d"}, keep_last=keep_last)


def _plan(root: Path, resume: str = "auto", verify: str = "sha256") -> reshard.ResumePlan | None:
    return reshard.plan_resume(root, resume, 1, 8, 2, verify=verify)


class TorchSavingEngine(FakeEngine):
    """Writes its model file with torch's real serializer (which reports a full disk without errno)."""

    def save_checkpoint(self, root: str, tag: str, client_state: dict, save_latest: bool) -> None:
        d = Path(root) / tag
        d.mkdir(parents=True, exist_ok=True)
        torch.save({"w": torch.zeros(64 << 10)}, d / "mp_rank_00_model_states.pt")  # 256 KiB


@pytest.fixture
def tiny_disk(tmp_path: Path):
    """A 1 MiB tmpfs (a real full disk, not a mock); skips where mounting is not allowed."""
    where = tmp_path / "disk"
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_disk_full_during_a_save_is_one_line_cleans_the_partial_tag_keeps_the_rest(tiny_disk: Path) -> None:
    """Issue 24: a full disk ended in ``enforce fail at inline_container.cc`` and left a partial tag."""
    root = tiny_disk / "checkpoints"
    ckpt.save(TorchSavingEngine(), root, 3, {"model_hash": "m", "data_fingerprint": "d"}, keep_last=5)
    assert [s for s, _ in list_tags(root)] == [3]
    free = shutil.disk_usage(tiny_disk).free
    (tiny_disk / "filler").write_bytes(b"x" * (free - 100_000))  # room for less than one more checkpoint
    with pytest.raises(ckpt.StorageFullError) as err:
        ckpt.save(TorchSavingEngine(), root, 6, {"model_hash": "m", "data_fingerprint": "d"}, keep_last=5)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"no space left on {root} while saving step0000006 ("), msg
    assert "removed the partial step0000006, kept the complete checkpoints (step0000003)" in msg
    assert isinstance(err.value, ConfigError)  # the entry point prints it as one line, no traceback
    assert not (root / "step0000006").exists()
    assert ckpt.verify(root / "step0000003") is None  # the older checkpoint is whole
    # another failure on a disk with room is not blamed on space
    (tiny_disk / "filler").unlink()

    class Broken(FakeEngine):
        def save_checkpoint(self, *a, **k) -> None:
            raise RuntimeError("something else")

    with pytest.raises(RuntimeError, match="something else"):
        ckpt.save(Broken(), root, 9, {}, keep_last=5)


# ------------------------------------------------------------------ fast: verification logic
def test_complete_marker_records_sizes_checksums_and_identity(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    _save(root, 2)
    marker = json.loads((root / "step0000002" / COMPLETE).read_text())
    files = marker["files"]
    assert set(files) == {"mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt", "rng_rank0.pt"}
    for rel, rec in files.items():
        assert rec["size"] == (root / "step0000002" / rel).stat().st_size and len(rec["sha256"]) == 64
    assert marker["model_hash"] == "m" and marker["data_fingerprint"] == "d" and marker["world_size"] == 1
    assert ckpt.verify(root / "step0000002") is None


def test_truncated_newest_checkpoint_is_skipped_reported_and_kept(tmp_path: Path, capsys) -> None:
    root = tmp_path / "checkpoints"
    _save(root, 2, 4)
    model = root / "step0000004" / "mp_rank_00_model_states.pt"
    size = model.stat().st_size
    os.truncate(model, 10)
    plan = _plan(root)
    assert plan is not None and plan.path == root / "step0000002"
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"warning: checkpoint step0000004 is corrupt (file mp_rank_00_model_states.pt: size 10 != recorded {size}); "
        f"resuming from step0000002 instead; step0000004 kept for inspection as {err[0].split(' as ')[-1]}"
    ]
    kept = [p for p in root.iterdir() if p.name.startswith("step0000004.corrupt-")]
    assert len(kept) == 1 and (kept[0] / "mp_rank_00_model_states.pt").stat().st_size == 10
    assert err[0].endswith(kept[0].name)
    # the resumed run saves step 4 again: a fresh directory; retention never counts or deletes the kept one
    _save(root, 4, 6, 8, keep_last=2)
    assert [s for s, _ in list_tags(root)] == [6, 8] and kept[0].is_dir()
    assert _plan(root).path == root / "step0000008"


def test_same_size_damage_needs_the_checksum(tmp_path: Path, capsys) -> None:
    """A file of the right size with other bytes (e.g. zeros a crashed node left): sizes alone
    miss it, the sha256 catches it."""
    root = tmp_path / "checkpoints"
    _save(root, 2, 4)
    f = root / "step0000004" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    f.write_bytes(b"\0" * f.stat().st_size)
    assert _plan(root, verify="size").path == root / "step0000004"
    assert _plan(root).path == root / "step0000002"
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt: sha256" in capsys.readouterr().err


def test_nothing_verifies_or_explicit_corrupt_is_refused_and_nothing_moves(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    _save(root, 2, 4)
    for s in (2, 4):
        (root / f"step000000{s}" / "rng_rank0.pt").unlink()
    with pytest.raises(ConfigError, match=r"no checkpoint .* verifies: step0000004 \(file rng_rank0.pt: missing\); "
                                          r"step0000002"):
        _plan(root)
    with pytest.raises(ConfigError, match="checkpoint .*step0000002 is corrupt"):
        _plan(root, str(root / "step0000002"))
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step0000002", "step0000004"]


def test_markers_without_records_are_trusted_as_before(tmp_path: Path) -> None:
    tag = tmp_path / "checkpoints" / "step0000004"
    tag.mkdir(parents=True)
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"")
    (tag / COMPLETE).write_text(json.dumps({"step": 4, "world_size": 1}))
    assert _plan(tmp_path / "checkpoints").path == tag


# ------------------------------------------------------------------ fast: no arbitrary unpickling
class _Payload:
    """Unpickling this runs ``Path(marker).touch()``: what a hostile rng file could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (Path.touch, (self.marker,))


def test_rng_file_with_a_pickled_callable_is_refused_and_never_runs(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    _save(root, 2)
    tag = root / "step0000002"
    marker = tmp_path / "pwned"
    torch.save({"format": 1, "x": _Payload(marker)}, tag / "rng_rank0.pt")
    with pytest.raises(ConfigError) as err:
        ckpt.load(FakeEngine(), tag)
    msg = str(err.value)
    assert "\n" not in msg and "refusing to load" in msg and "rng_rank0.pt" in msg, msg
    assert not marker.exists()  # the payload never ran
    torch.load(tag / "rng_rank0.pt", weights_only=False)  # control: the old full unpickling runs it
    assert marker.exists()


def test_rng_state_round_trips_bit_exactly_as_plain_tensors(tmp_path: Path) -> None:
    import random

    import numpy as np

    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1), np.random.randn()  # noqa: B018 - leave cached gaussians in both states
    ckpt.atomic_torch_save(ckpt.rng_state(), tmp_path / "rng.pt")
    draw = (random.random(), random.gauss(0, 1), float(np.random.randn()), torch.rand(4))
    ckpt.set_rng_state(ckpt.load_rng(tmp_path / "rng.pt"))
    again = (random.random(), random.gauss(0, 1), float(np.random.randn()), torch.rand(4))
    assert draw[:3] == again[:3] and torch.equal(draw[3], again[3])


# ------------------------------------------------------------------ slow: real 2-rank runs
@pytest.fixture(scope="module")
def shards(data_corpus) -> Path:
    return data_corpus.shards_dir


@pytest.mark.slow
def test_corrupt_newest_checkpoint_resumes_from_previous_bit_identically(shards: Path, tmp_path: Path) -> None:
    args = ["train.max_steps=20", "train.save_interval=3"]
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    run_training(RDT, ref_dir, shards, args)

    proc = start_training(RDT, run_dir, shards, args)
    wait_for_step(run_dir, 7, proc)  # checkpoint 6 is complete
    kill_group(proc, signal.SIGKILL)
    tags = list_tags(run_dir / "checkpoints")
    assert len(tags) >= 2 and tags[-1][0] >= 6, tags
    bad, good = tags[-1][1], tags[-2][1]
    victim = bad / "mp_rank_00_model_states.pt"
    size = victim.stat().st_size
    os.truncate(victim, size // 2)

    proc = run_training(RDT, run_dir, shards, args)
    out = proc.stdout + proc.stderr
    lines = [ln for ln in out.splitlines() if f"checkpoint {bad.name} is corrupt" in ln]
    assert len(lines) == 1, out[-3000:]  # rank 0 only
    assert (f"(file mp_rank_00_model_states.pt: size {size // 2} != recorded {size}); resuming from {good.name} "
            f"instead; {bad.name} kept for inspection as {bad.name}.corrupt-") in lines[0]
    assert json.loads((run_dir / "run_info.json").read_text())["resumed_from"] == str(good)
    assert train_losses(run_dir) == train_losses(ref_dir)
    kept = [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(f"{bad.name}.corrupt-")]
    assert len(kept) == 1 and (kept[0] / victim.name).stat().st_size == size // 2
    assert [s for s, _ in list_tags(run_dir / "checkpoints")] == [18, 20]  # keep_last=2 as usual


@pytest.fixture(scope="module")
def short_run(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("resume_guard") / "run"
    run_training(RDT, run, shards, ["train.max_steps=2", "train.save_interval=2"])
    return run


@pytest.mark.slow
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.mlp_hidden=64", "different model"),  # other shapes: DeepSpeed's load would fail first
        ("model.loops.mean=3", "different model hash"),  # same shapes: only the hash tells
        ("data.seed=1", "different data fingerprint"),
    ],
)
def test_resume_after_model_or_data_change_is_one_line_exit_2(short_run: Path, shards: Path, tmp_path: Path,
                                                              override: str, message: str) -> None:
    run = tmp_path / "run"
    shutil.copytree(short_run, run)
    proc = run_training(RDT, run, shards, ["train.max_steps=4", "train.save_interval=2", override], check=False,
                        launcher="deepspeed")  # torchrun reports a failed rank as exit 1; deepspeed passes 2 on
    out = proc.stdout + proc.stderr
    errors = {ln for ln in out.splitlines() if "error:" in ln}
    assert proc.returncode == 2, out[-3000:]
    assert len(errors) == 1 and message in errors.pop(), out[-3000:]  # both ranks: the same one line
    assert "Traceback" not in out, out[-3000:]
    assert [s for s, _ in list_tags(run / "checkpoints")] == [2]


@pytest.mark.slow
def test_zero0_nan_guard_skips_the_update(shards: Path, tmp_path: Path) -> None:
    """No ZeRO optimizer skips the bad update for us at stage 0: the trainer drops the grads."""
    run = tmp_path / "nan0"
    proc = run_training(RDT, run, shards, ["deepspeed.config=configs/deepspeed/zero0.yaml", "train.max_steps=3",
                                           "train.save_interval=1", "train.keep_last=3",
                                           "train.inject_nan_steps=[2]"], check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    m = {r["step"]: r for r in metrics(run) if "train/loss" in r}
    assert m[2]["train/skipped_updates"] == 1 and m[3]["train/skipped_updates"] == 1 and m[1]["train/bad_steps"] == 0
    tags = dict(list_tags(run / "checkpoints"))
    w = {s: torch.load(tags[s] / "mp_rank_00_model_states.pt", weights_only=False)["module"] for s in (1, 2, 3)}
    assert all(torch.equal(w[1][k], w[2][k]) for k in w[1])  # step 2's update was skipped
    assert not all(torch.equal(w[2][k], w[3][k]) for k in w[2])  # step 3's was not


SPIKE = ["train.spike.action=rollback", "train.spike.window=8", "train.spike.min_history=4", "train.spike.sigma=4",
         "train.spike.rollback_after=2", "train.spike.lr_factor=0.5", "train.inject_spike_batches=[6,10,11]",
         "train.save_interval=4", "train.keep_last=5", "train.max_steps=16"]


@pytest.mark.slow
def test_loss_spike_is_skipped_then_rolled_back_and_a_fresh_resume_reproduces_it(shards: Path, tmp_path: Path) -> None:
    """Issue 22, on 2 ranks: an injected finite spike (loss x100 on global batch 6) is flagged and its
    update skipped; two in a row (batches 10, 11: steps 11, 12) roll every rank back to step 8, the
    newest checkpoint before them, skip those two batches and halve the lr; the run finishes. A fresh
    resume from that checkpoint with the run's rollbacks.json reproduces every later loss bit for bit."""
    run = tmp_path / "run"
    proc = run_training(RDT, run, shards, SPIKE)
    out = proc.stdout + proc.stderr
    assert "step 7: loss" in out and "is a spike" in out and "update skipped (1 in a row)" in out, out[-3000:]
    assert f"rolled back to {run / 'checkpoints' / 'step0000008'} (step 8) after loss spikes at steps [11, 12]: " \
           "skipping 2 global batch(es) at step 11, lr x0.5 from there" in out, out[-3000:]
    events = json.loads((run / "rollbacks.json").read_text())
    assert events == [{"detected_at": 12, "flagged_steps": [11, 12], "checkpoint": "step0000008", "to_step": 8,
                       "skip_from_step": 11, "skip_batches": 2, "lr_factor": 0.5}]
    rows = {m["step"]: m for m in metrics(run) if "train/loss" in m}
    assert sorted(rows) == list(range(1, 17))  # every step once: the rolled-back steps were rewritten
    assert rows[7]["train/loss"] > 50 * rows[6]["train/loss"] and rows[7]["train/skipped_updates"] == 1
    assert all(r["train/loss"] < 2 * rows[1]["train/loss"] for s, r in rows.items() if s != 7)  # no spike after
    assert rows[16]["train/rollbacks"] == 1 and rows[16]["train/skipped_updates"] == 1
    assert rows[11]["train/lr"] == pytest.approx(0.5 * rows[10]["train/lr"], rel=0.2)  # halved (and decaying)
    last = [json.loads(ln) for ln in (run / "consumed.jsonl").read_text().splitlines()][-1]
    assert last["step"] == 16 and last["skipped_updates"] == 1 and last["skipped_batches"] == 2

    fresh = tmp_path / "fresh"
    (fresh / "checkpoints").mkdir(parents=True)
    shutil.copytree(run / "checkpoints" / "step0000008", fresh / "checkpoints" / "step0000008")
    shutil.copy(run / "rollbacks.json", fresh / "rollbacks.json")
    again = run_training(RDT, fresh, shards, SPIKE)
    assert "resumed from" in again.stdout and "rolled back" not in again.stdout + again.stderr
    assert {s: r for s, r in train_losses(fresh).items() if s > 8} == {s: r for s, r in train_losses(run).items()
                                                                       if s > 8}
    consumed = [(d / "consumed.jsonl").read_text().splitlines()[-1] for d in (fresh, run)]
    assert consumed[0] == consumed[1]
