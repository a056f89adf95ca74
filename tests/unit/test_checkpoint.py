"""Checkpoint atomicity without a launcher: a save that crashes midway never becomes the resume
target, DeepSpeed's ``latest`` is not trusted, and retention keeps the newest complete ones."""

from __future__ import annotations

from pathlib import Path

import pytest

import mythos.io
from mythos.run_dir import list_tags
from mythos.train import checkpoint as ckpt
from mythos.train.config import OptimConfig
from mythos.train.optim import lr_multiplier


class FakeEngine:
    """Writes files the way DeepSpeed does (rank 0 writes ``latest`` before the others finish)
    and can crash after its first file."""

    def __init__(self, crash: bool = False) -> None:
        self.crash = crash

    def save_checkpoint(self, root: str, tag: str, client_state: dict, save_latest: bool) -> None:
        d = Path(root) / tag
        d.mkdir(parents=True, exist_ok=True)
        (d / "mp_rank_00_model_states.pt").write_bytes(b"model")
        (Path(root) / "latest").write_text(tag)
        if self.crash:
            raise RuntimeError("node died mid-save")
        (d / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"optim")


def test_crash_mid_save_keeps_last_good_checkpoint(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    ckpt.save(FakeEngine(), root, 10, {}, keep_last=3)
    with pytest.raises(RuntimeError, match="mid-save"):
        ckpt.save(FakeEngine(crash=True), root, 20, {}, keep_last=3)
    assert (root / "latest").read_text() == "step0000020"  # DeepSpeed's pointer is already wrong
    assert ckpt.find_resume(root, "auto") == root / "step0000010"
    # saving the same step again replaces the broken directory, then it is the newest
    ckpt.save(FakeEngine(), root, 20, {}, keep_last=3)
    assert ckpt.find_resume(root, "auto") == root / "step0000020"
    assert (root / "step0000020" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").is_file()


def test_retention_and_explicit_resume(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    for s in (1, 2, 3, 4):
        ckpt.save(FakeEngine(), root, s, {}, keep_last=2)
    assert [s for s, _ in list_tags(root)] == [3, 4]
    assert not any(p.name.startswith(".deleting") for p in root.iterdir())
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        ckpt.find_resume(root, str(root / "step0000001"))
    assert ckpt.find_resume(root, "none") is None
    assert ckpt.find_resume(tmp_path / "empty", "auto") is None


def test_atomic_write_never_leaves_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "COMPLETE"
    ckpt.atomic_write_text(target, "old\n")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(mythos.io.os, "replace", boom)
    with pytest.raises(OSError):
        ckpt.atomic_write_text(target, "new\n")
    assert target.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["COMPLETE"]


def test_schedules() -> None:
    cos = OptimConfig(schedule="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_multiplier(0, 100, cos) == pytest.approx(0.1) and lr_multiplier(9, 100, cos) == 1.0
    assert lr_multiplier(99, 100, cos) == pytest.approx(0.1, abs=1e-3)
    wsd = OptimConfig(schedule="wsd", warmup_steps=10, decay_fraction=0.2, min_lr_ratio=0.0)
    assert lr_multiplier(50, 100, wsd) == 1.0 and lr_multiplier(79, 100, wsd) == 1.0
    assert lr_multiplier(89, 100, wsd) == pytest.approx(0.5) and lr_multiplier(99, 100, wsd) == 0.0


def test_saving_a_step_that_is_already_complete_leaves_it_untouched(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    ckpt.save(FakeEngine(), root, 5, {}, keep_last=3)
    before = {p.name: p.stat().st_mtime_ns for p in (root / "step0000005").iterdir()}
    ckpt.save(FakeEngine(crash=True), root, 5, {}, keep_last=3)  # would crash if it wrote anything
    assert {p.name: p.stat().st_mtime_ns for p in (root / "step0000005").iterdir()} == before
