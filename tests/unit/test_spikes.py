"""Loss-spike detection and its records, in process: the detector's flags (one-sided, after
``min_history``, flagged losses kept out of the window, state round trip), the rollback log
(what to skip and when, the lr factor, a fresh start forgets it), the loader's batch skip, and the
config's one-line refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mythos.config import ConfigError, from_dict
from mythos.data import DataConfig, build_train_loader
from mythos.train.config import SpikeConfig, TrainConfig
from mythos.train.spikes import ROLLBACKS, RollbackLog, SpikeDetector


def _losses(n: int, start: float = 5.0) -> list[float]:
    """A slowly falling, slightly noisy loss curve (deterministic)."""
    return [start - 0.01 * i + 0.02 * ((i * 7) % 5 - 2) for i in range(n)]


def test_detector_flags_only_upward_spikes_after_the_history() -> None:
    det = SpikeDetector(SpikeConfig(action="skip", window=10, sigma=6.0, min_history=5))
    assert not det.check(50.0)  # no history yet: even a huge loss is not judged
    det = SpikeDetector(SpikeConfig(action="skip", window=10, sigma=6.0, min_history=5))
    assert [det.check(x) for x in _losses(12)] == [False] * 12
    assert det.check(10.0) and det.flagged_total == 1  # ~2x the running mean
    assert len(det.history) == 10 and 10.0 not in det.history  # a flagged loss never joins the window
    assert not det.check(1.0)  # a sudden drop is progress, not a spike
    assert not det.check(float("nan"))  # non-finite: the NaN guard's business
    off = SpikeDetector(SpikeConfig(action="off", window=10, min_history=5))
    assert [off.check(x) for x in [*_losses(12), 1e6]] == [False] * 13


def test_detector_state_round_trips() -> None:
    cfg = SpikeConfig(action="rollback", window=8, min_history=4)
    a = SpikeDetector(cfg)
    for x in _losses(6):
        a.check(x)
    b = SpikeDetector(cfg, json.loads(json.dumps(a.state_dict())))  # through the checkpoint's JSON-able state
    for x in [*_losses(5, 4.9), 9.0, 4.8]:
        assert a.check(x) == b.check(x)
    assert a.state_dict() == b.state_dict()


def test_rollback_log_skips_lr_and_fresh_start(tmp_path: Path) -> None:
    log = RollbackLog(tmp_path, enabled=True, resuming=False)
    event = {"detected_at": 12, "flagged_steps": [10, 11, 12], "checkpoint": "step0000008", "to_step": 8,
             "skip_from_step": 10, "skip_batches": 3, "lr_factor": 0.5}
    log.add(event)
    assert json.loads((tmp_path / ROLLBACKS).read_text()) == [event]
    again = RollbackLog(tmp_path, enabled=False, resuming=True)  # another rank, or a resume
    assert again.skips_at(10) == 3 and again.skips_at(9) == again.skips_at(11) == 0
    assert again.lr_factor(9) == 1.0 and again.lr_factor(10) == again.lr_factor(50) == 0.5
    RollbackLog(tmp_path, enabled=True, resuming=False)  # a fresh start at step 0: an old record does not apply
    assert not (tmp_path / ROLLBACKS).exists()


def test_loader_skip_passes_batches_and_survives_resume(data_corpus) -> None:
    cfg = DataConfig(shards=str(data_corpus.shards_dir))
    ref = build_train_loader(cfg, 16, 8)
    batches = [torch.cat([m["sample_ids"] for m in ref.next_step()]) for _ in range(6)]
    ld = build_train_loader(cfg, 16, 8)
    ld.next_step()
    state = ld.state_dict()
    ld.skip(2)
    assert ld.batches_drawn == 3 and ld.state_dict()["steps"] == 1 and ld.state_dict()["skipped_batches"] == 2
    assert torch.equal(torch.cat([m["sample_ids"] for m in ld.next_step()]), batches[3])
    resumed = build_train_loader(cfg, 16, 8)
    resumed.load_state_dict(ld.state_dict())
    assert torch.equal(torch.cat([m["sample_ids"] for m in resumed.next_step()]), batches[4])
    before = build_train_loader(cfg, 16, 8)
    before.load_state_dict(state)  # a state from before the skip does not skip
    assert torch.equal(torch.cat([m["sample_ids"] for m in before.next_step()]), batches[1])


@pytest.mark.parametrize(("spike", "message"), [
    ({"window": 1}, "spike.window must be >= 2"),
    ({"min_history": 80}, "1 <= spike.min_history <= spike.window"),
    ({"lr_factor": 0}, "spike.lr_factor must be in (0, 1]"),
    ({"rollback_after": 0}, "spike.rollback_after >= 1"),
    ({"action": "panic"}, "'panic' is not one of 'off', 'skip', 'rollback'"),
])
def test_impossible_spike_configs_are_one_line(spike: dict, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        from_dict(TrainConfig, {"max_steps": 10, "spike": spike})
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_a_rollback_without_a_good_checkpoint_or_past_the_cap_is_one_line(tmp_path: Path) -> None:
    """Trainer.rollback refuses before touching the engine: no complete checkpoint before the first
    flagged step, or train.spike.max_rollbacks used up; one line naming the steps and checkpoint."""
    from types import SimpleNamespace

    from mythos.run_dir import COMPLETE, tag_for
    from mythos.train.trainer import Trainer, TrainingStopped

    root = tmp_path / "checkpoints"
    for step in (4, 8):  # two complete checkpoints (fake files), one after the spike began
        tag = root / tag_for(step)
        tag.mkdir(parents=True)
        (tag / "mp_rank_00_model_states.pt").write_bytes(b"x")
        (tag / COMPLETE).write_text(json.dumps({"step": step}))
    cfg = SimpleNamespace(train=SimpleNamespace(spike=SpikeConfig(action="rollback", max_rollbacks=1)))
    stub = SimpleNamespace(cfg=cfg, spikes=SimpleNamespace(streak=[3, 4, 5]), ckpt_root=root, step=5,
                           rollbacks=RollbackLog(tmp_path, enabled=False, resuming=False))
    with pytest.raises(TrainingStopped) as exc:
        Trainer.rollback(stub)
    msg = str(exc.value)
    assert msg == ("stopping: loss spikes at steps [3, 4, 5] and no complete checkpoint before the spike to roll "
                   "back to (lower train.save_interval); last good checkpoint: none before the spike; lower optim.lr "
                   "or check the data"), msg
    stub.spikes.streak, stub.step = [9, 10, 11], 11
    stub.rollbacks.events.append({"skip_from_step": 6, "skip_batches": 0, "lr_factor": 1.0})
    with pytest.raises(TrainingStopped, match=r"spikes at steps \[9, 10, 11\] and 1 rollbacks already "
                                              r"\(train.spike.max_rollbacks=1\); last good checkpoint: .*step0000008"):
        Trainer.rollback(stub)
