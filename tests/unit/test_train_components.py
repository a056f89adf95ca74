"""The trainer's components in isolation: throughput / MFU bookkeeping, run provenance and the
consumed-data record (the end-to-end behaviour is in tests/test_train.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mythos.accounting import flops_per_token
from mythos.model import load_model_config
from mythos.train.audit import ConsumedRecord, ids_checksum, read_consumed
from mythos.train.config import SpikeConfig, load_run_config
from mythos.train.evaluate import evaluate
from mythos.train.provenance import git_commit, run_info, section_hash, write_run_files
from mythos.train.spikes import SpikeDetector
from mythos.train.state import CLIENT_KEYS, Progress, TrainState
from mythos.train.throughput import Throughput

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------- throughput
def test_throughput_window_metrics_and_mfu() -> None:
    cfg = load_model_config("rdt-tiny", ["checkpoint_loops=true"])
    tp = Throughput(cfg, seq_len=256, tokens_per_step=2048, world_size=2, peak_flops=1e12)
    model = flops_per_token(cfg, 256).total
    assert tp.model_flops_per_token == model
    for seconds in (0.5, 1.5, 1.0):  # mean 1.0 s per step
        tp.add_step(seconds, 0.25, executed=(6.0, 2.0))
    m = tp.window_metrics()
    assert m["perf/step_time_s"] == 1.0 and m["perf/tokens_per_s"] == 2048
    assert m["perf/tokens_per_s_per_device"] == 1024 and m["perf/data_wait_frac"] == 0.25
    assert m["perf/mfu"] == pytest.approx(1024 * model / 1e12)
    hw = flops_per_token(cfg, 256, loops_mean=6.0, bwd_loops_mean=2.0, include_recompute=True).total
    assert m["perf/hfu"] == pytest.approx(1024 * hw / 1e12) and hw > model  # 6 loops + recompute
    # a new window starts empty: its numbers are its own steps only
    tp.add_step(2.0, 0.0)
    assert tp.window_metrics()["perf/step_time_s"] == 2.0


def test_throughput_without_peak_reports_no_mfu() -> None:
    tp = Throughput(load_model_config("dense-tiny"), seq_len=128, tokens_per_step=512, world_size=1, peak_flops=None)
    tp.add_step(1.0, 0.0)
    m = tp.window_metrics()
    assert "perf/mfu" not in m and m["perf/hardware_tflops_per_device"] == pytest.approx(
        m["perf/model_tflops_per_device"])  # dense, no checkpointing: what runs is what is charged


# ---------------------------------------------------------------------------- provenance
def test_provenance_files(tmp_path: Path) -> None:
    cfg = load_run_config(REPO / "configs/run/rdt-tiny-cpu.yaml")
    other = load_run_config(REPO / "configs/run/rdt-tiny-cpu.yaml", ["model.d_model=128"])
    assert section_hash(cfg.model) == section_hash(load_run_config(REPO / "configs/run/rdt-tiny-cpu.yaml").model)
    assert section_hash(cfg.model) != section_hash(other.model)
    info = run_info(cfg, world_size=2, params=123)
    assert info["world_size"] == 2 and info["model_hash"] == section_hash(cfg.model)
    assert len(git_commit(REPO)) == 40
    write_run_files(tmp_path / "run", cfg, {"train_batch_size": 8}, info)
    assert json.loads((tmp_path / "run" / "run_info.json").read_text())["params"] == 123
    assert json.loads((tmp_path / "run" / "ds_config.json").read_text())["train_batch_size"] == 8
    assert load_run_config(tmp_path / "run" / "config.resolved.yaml") == cfg


# ---------------------------------------------------------------------------- consumed record
def test_ids_checksum_is_an_order_free_multiset_checksum() -> None:
    ids = np.arange(1000, 1512)
    c = ids_checksum(ids)
    assert c == ids_checksum(ids[::-1]) and c.is_integer()
    assert c != ids_checksum(np.concatenate([ids[:-1], ids[:1]]))  # one sample repeated, one skipped
    assert c < 2**53  # exact in the fp64 all-reduce


def test_consumed_record_chains_resumes_and_refuses_wrong_data(tmp_path: Path) -> None:
    steps = [ids_checksum(np.arange(s * 8, s * 8 + 8)) for s in range(6)]
    ref = ConsumedRecord(tmp_path / "ref", enabled=True)
    (tmp_path / "ref").mkdir()
    for s, c in enumerate(steps, start=1):
        ref.add(s, c, c, 8)
        ref.flush(s)
    # a run that saved after step 3, crashed after writing step 4, and resumed from step 3
    (tmp_path / "run").mkdir()
    run = ConsumedRecord(tmp_path / "run", enabled=True)
    for s, c in enumerate(steps[:4], start=1):
        run.add(s, c, c, 8)
        if s == 3:
            saved = run.state_dict()
        run.flush(s)
    run = ConsumedRecord(tmp_path / "run", enabled=True)
    run.load_state_dict(saved)
    run.rewind(3)
    for s, c in enumerate(steps[3:], start=4):
        run.add(s, c, c, 8)
        run.flush(s)
    assert read_consumed(tmp_path / "run") == read_consumed(tmp_path / "ref")
    assert len(read_consumed(tmp_path / "ref")) == 6
    with pytest.raises(RuntimeError, match="step 7: the ranks trained on samples that differ"):
        run.add(7, steps[0], steps[1], 8)


def test_finish_destroys_the_process_group(tmp_path) -> None:
    """A run that succeeded tears its process group down before the interpreter exits (Gloo
    threads alive at finalisation can abort a finished rank with exit -6)."""
    import torch.distributed as tdist

    from mythos import dist

    tdist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert dist.initialized()
    dist.finish()
    assert not tdist.is_initialized()
    dist.finish()  # no process group: a no-op


def test_evaluate_refuses_an_empty_split_instead_of_logging_zero() -> None:
    """Issue 24: an empty val split logged val loss 0.0 / ppl 1.0; evaluate() now raises (the
    trainer skips evaluation with one warning line when its val split is empty)."""
    cfg = load_model_config("dense-tiny")
    with pytest.raises(ValueError, match="no val tokens"):
        evaluate(lambda *a, **k: None, lambda: iter(()), cfg, torch.device("cpu"))


class _Counter:
    """A stand-in stateful component (the loader's role in these tests)."""

    def __init__(self) -> None:
        self.n = 0

    def state_dict(self) -> dict:
        return {"n": self.n}

    def load_state_dict(self, state: dict) -> None:
        self.n = int(state.get("n", 0))


def test_client_state_is_exactly_the_contract_and_refuses_a_component_outside_it(tmp_path: Path) -> None:
    """docs/design.md: the client state has exactly ``CLIENT_KEYS``, in that order; a component
    added without its key in the list is refused at the first save, as is one missing; an older
    checkpoint without a nested key restores that component's fresh state."""
    def state(**nested: object) -> TrainState:
        parts = {"data": _Counter(), "consumed": ConsumedRecord(tmp_path, enabled=False),
                 "spikes": SpikeDetector(SpikeConfig(action="skip")), **nested}
        return TrainState(Progress(step=2), {k: v for k, v in parts.items() if v is not None},
                          model_hash="m", data_fingerprint="f")

    assert tuple(state().state_dict()) == CLIENT_KEYS
    with pytest.raises(RuntimeError, match="differ from CLIENT_KEYS"):
        state(ema=_Counter()).state_dict()
    with pytest.raises(RuntimeError, match="differ from CLIENT_KEYS"):
        state(spikes=None).state_dict()
    old = {k: v for k, v in state().state_dict().items() if k != "spikes"}  # before spike handling
    fresh = state()
    fresh.nested["spikes"].streak = [7]
    fresh.load_state_dict(old, Path("step0000002"))
    assert fresh.nested["spikes"].streak == [] and fresh.progress.step == 2
