"""Guarantees that only a launch used to check, checked in-process (issue 22, item 3).

Each test here was written because breaking its guarantee on purpose in a scratch copy failed no
fast test (docs/testing.md, "Guarantees broken on purpose", says how each was broken):

- the trainer's step (``Trainer.train_step`` on a stub holding a fake DeepSpeed engine that runs
  a tiny real model): each sample's loop count and h0 come from its *global* position whatever
  the world size; the accumulated loss is token-weighted (the gradients of 2 micro-batches with
  unequal label counts, or of 2 ranks, equal one big batch's); a non-finite loss drops the update
  (ZeRO-0); the lr schedule is applied;
- the lr warmup ends at the peak, never above it;
- the derived DeepSpeed config clips at ``optim.grad_clip``;
- checkpoint verification: a truncated file (size) and a same-size damaged file (sha256) are
  caught, and the resume falls back to the previous tag;
- a resume restores the loader position (``TrainState.load_state_dict``): the next batch is the one the
  uninterrupted loader draws;
- the batch-wide KL early exit of cached decoding with explicit ``loop_counts``.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import mythos
from mythos.config import ConfigError
from mythos.data import build_train_loader
from mythos.data.config import DataConfig
from mythos.model import KVCache, ModelConfig
from mythos.model.config import LoopConfig
from mythos.model.loops import sample_loop_counts
from mythos.model.loss import IGNORE_INDEX
from mythos.train import checkpoint as ckpt
from mythos.train.audit import ConsumedRecord
from mythos.train.config import OptimConfig, SpikeConfig, load_run_config
from mythos.train.ds_config import build_ds_config
from mythos.train.loop_layout import LoopLayout, h0_noise
from mythos.train.optim import lr_multiplier
from mythos.train.reshard import choose_checkpoint
from mythos.train.spikes import SpikeDetector
from mythos.train.state import CLIENT_KEYS, Progress, TrainState
from mythos.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]
VOCAB, SEQ, SEED = 97, 12, 3


def tiny(**kw: Any) -> ModelConfig:
    """A 1+2+1-layer RDT, d=32: a forward/backward costs milliseconds."""
    base: dict[str, Any] = dict(kind="rdt", vocab_size=VOCAB, d_model=32, n_heads=2, max_seq_len=SEQ,
                                zero_init_out=False, n_prelude=1, n_core=2, n_coda=1,
                                loops=LoopConfig(schedule="fixed", mean=2, bwd_depth=0), h0="zeros")
    base.update(kw)
    cfg = ModelConfig(**base)
    cfg.validate()
    return cfg


class FakeEngine:
    """What ``train_step`` uses of a DeepSpeed engine, on one rank: ``backward`` scales the loss by
    1 / accumulation steps as DeepSpeed does, ``step`` runs a plain SGD step. Records every
    forward's keyword arguments."""

    def __init__(self, model: torch.nn.Module, accum: int) -> None:
        self.module, self.accum = model, accum
        self.optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        self._config = SimpleNamespace(gradient_clipping=1.0)
        self.skipped_steps = 0
        self.calls: list[dict[str, Any]] = []

    def __call__(self, ids: torch.Tensor, labels: torch.Tensor, **kw: Any) -> Any:
        self.calls.append(kw)
        return self.module(ids, labels=labels, **kw)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accum).backward()

    def step(self) -> None:
        self.optimizer.step()

    def get_global_grad_norm(self) -> None:
        return None


def stub_trainer(model_cfg: ModelConfig, *, accum: int, world: int, layout: LoopLayout | None = None,
                 step: int = 0, zero_stage: int = 2, nan_steps: tuple[int, ...] = (),
                 optim: OptimConfig | None = None, model: torch.nn.Module | None = None) -> SimpleNamespace:
    """The attributes ``Trainer.train_step`` reads, around a :class:`FakeEngine`."""
    if model is None:
        torch.manual_seed(0)
        model = mythos.build_model(model_cfg).train()
    optim = optim or OptimConfig(warmup_steps=0, schedule="constant")
    cfg = SimpleNamespace(model=model_cfg, optim=optim,
                          train=SimpleNamespace(seed=SEED, inject_nan_steps=nan_steps, inject_spike_batches=()))
    engine = FakeEngine(model, accum)
    return SimpleNamespace(
        cfg=cfg, engine=engine, layout=layout, accum=accum, info=SimpleNamespace(world_size=world, is_main=True),
        device=torch.device("cpu"), cuda=False, step=step, total_steps=100,
        rollbacks=SimpleNamespace(events=[]), base_lrs=[0.1], spikes=SimpleNamespace(check=lambda loss: False),
        zero_stage=zero_stage,
    )


def batch(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` samples; sample i has ``2 + i % 5`` labelled tokens (unequal label counts)."""
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))
    labels = torch.full_like(ids, IGNORE_INDEX)
    for i in range(n):
        k = 2 + i % 5
        labels[i, -k:] = ids[i, -k:]
    return ids, labels


def micro_batches(positions: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor, m: int) -> list[dict[str, Any]]:
    """The loader's contract: micro-batches of ``m`` rows of the given global positions."""
    return [{"input_ids": ids[p], "labels": labels[p], "positions": p, "sample_ids": p}
            for p in positions.split(m)]


def global_tokens(labels: torch.Tensor) -> float:
    return float((labels != IGNORE_INDEX).sum())


# ---------------------------------------------------------------------------- the trainer's step
@pytest.mark.parametrize("world", [2, 4])
def test_each_global_position_gets_the_same_loop_count_and_h0_on_any_world_size(world: int) -> None:
    """Claim: a sample's T and h0 are functions of (seed, step, global position), so the trainer
    hands every global position the same T and initial state on 1 rank as on ``world`` ranks
    (README: "a run on 1 rank trains like one on 2")."""
    loops = LoopConfig(schedule="poisson", mean=3, bwd_depth=2, max_loops=8)
    cfg = tiny(loops=loops, h0="noise", h0_std=0.5)
    b, m, step = 8, 2, 5
    ids, labels = batch(b)

    def per_position(w: int) -> dict[int, tuple[int, torch.Tensor]]:
        layout = LoopLayout(loops, SEED, b, m, w, lockstep=False)
        order = torch.from_numpy(layout(step))
        got: dict[int, tuple[int, torch.Tensor]] = {}
        for r in range(w):
            mine = order[r * b // w : (r + 1) * b // w]
            stub = stub_trainer(cfg, accum=b // (w * m), world=w, layout=layout, step=step)
            micro = micro_batches(mine, ids, labels, m)
            Trainer.train_step(stub, micro, global_tokens(labels))
            for mb, call in zip(micro, stub.engine.calls):
                for i, pos in enumerate(mb["positions"].tolist()):
                    got[pos] = (int(call["loop_counts"][i]), call["h0"][i])
        return got

    one, many = per_position(1), per_position(world)
    counts = sample_loop_counts(loops, SEED, step, b)
    assert sorted(one) == sorted(many) == list(range(b))
    assert len(set(counts.tolist())) > 1  # the test means something: the counts differ by position
    for pos in range(b):
        assert one[pos][0] == many[pos][0] == int(counts[pos]), pos
        assert torch.equal(one[pos][1], many[pos][1]), pos
    ref = h0_noise(0.5, SEED, step, torch.arange(b), (SEQ, cfg.d_model), torch.device("cpu"))
    assert all(torch.equal(one[p][1], ref[p]) for p in range(b))


def _grads(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_accumulated_and_data_parallel_loss_is_token_weighted() -> None:
    """Claim (README, token-weighted loss): 2 micro-batches with unequal label counts, and 2 ranks
    averaged like DeepSpeed's all-reduce, give the gradients and loss of one batch of 4 whose loss
    is the mean over all its label tokens (not a mean of per-micro-batch means)."""
    cfg = tiny()
    ids, labels = batch(4)
    labels[2:, :-1] = IGNORE_INDEX  # second half: 1 label per sample, first half: 2 and 3
    g = global_tokens(labels)
    pos = torch.arange(4)

    ref = stub_trainer(cfg, accum=1, world=1)
    ref.engine.step = lambda: None  # compare gradients, not updated weights
    stats_ref = Trainer.train_step(ref, micro_batches(pos, ids, labels, 4), g)
    want = _grads(ref.engine.module)

    accum = stub_trainer(cfg, accum=2, world=1)
    accum.engine.step = lambda: None
    stats = Trainer.train_step(accum, micro_batches(pos, ids, labels, 2), g)
    assert stats["loss"] == pytest.approx(stats_ref["loss"], rel=1e-6)
    for a, w in zip(_grads(accum.engine.module), want, strict=True):
        torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-7)

    ranks = []
    for r in range(2):  # each rank sees only its half; DeepSpeed averages the ranks' gradients
        s = stub_trainer(cfg, accum=1, world=2)
        s.engine.step = lambda: None
        Trainer.train_step(s, micro_batches(pos[2 * r : 2 * r + 2], ids, labels, 2), g)
        ranks.append(_grads(s.engine.module))
    for a, b_, w in zip(*ranks, want, strict=True):
        torch.testing.assert_close((a + b_) / 2, w, rtol=1e-5, atol=1e-7)


def test_a_non_finite_loss_drops_the_update_and_the_lr_follows_the_schedule() -> None:
    """Claims (README guards; the lr schedule): at ZeRO-0 a non-finite loss leaves every weight
    as it was and the step is reported bad and skipped; a finite one updates; each step's lr is
    the base lr times ``lr_multiplier(step)``."""
    cfg = tiny()
    ids, labels = batch(2)
    optim = OptimConfig(warmup_steps=4, schedule="cosine")
    s = stub_trainer(cfg, accum=1, world=1, zero_stage=0, nan_steps=(2,), optim=optim, step=1)
    before = [p.detach().clone() for p in s.engine.module.parameters()]
    stats = Trainer.train_step(s, micro_batches(torch.arange(2), ids, labels, 2), global_tokens(labels))
    assert stats["bad"] and stats["skipped"]
    assert all(torch.equal(p, q) for p, q in zip(s.engine.module.parameters(), before))
    assert s.engine.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * lr_multiplier(1, 100, optim))
    s.step = 2  # step 3 is finite: an update, at step 2's lr
    stats = Trainer.train_step(s, micro_batches(torch.arange(2), ids, labels, 2), global_tokens(labels))
    assert not stats["bad"] and not stats["skipped"]
    assert not all(torch.equal(p, q) for p, q in zip(s.engine.module.parameters(), before))
    assert s.engine.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * lr_multiplier(2, 100, optim))


# ---------------------------------------------------------------------------- lr, clipping
@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_warmup_is_linear_and_ends_at_the_peak(schedule: str) -> None:
    """Claim: the lr rises linearly over ``warmup_steps`` optimizer steps to exactly the peak at the
    last warmup step, and never exceeds it afterwards."""
    cfg = OptimConfig(schedule=schedule, warmup_steps=10)
    mults = [lr_multiplier(s, 100, cfg) for s in range(100)]
    assert mults[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert mults[9] == 1.0 and mults[10] == pytest.approx(1.0, abs=1e-3)
    assert max(mults) == 1.0 and min(mults) > 0


def test_the_derived_deepspeed_config_clips_at_grad_clip() -> None:
    """Claim: ``optim.grad_clip`` is the DeepSpeed config's ``gradient_clipping`` (0 = off)."""
    for clip in (0.37, 0.0):
        cfg = load_run_config(REPO / "configs/run/rdt-tiny-cpu.yaml", [f"optim.grad_clip={clip}"])
        assert build_ds_config(cfg, world_size=2, cuda=False)["gradient_clipping"] == clip


# ---------------------------------------------------------------------------- checkpoints
class FilesEngine:
    """Writes two checkpoint files the way DeepSpeed names them."""

    def save_checkpoint(self, root: str, tag: str, client_state: dict, save_latest: bool) -> None:
        d = Path(root) / tag
        d.mkdir(parents=True, exist_ok=True)
        (d / "mp_rank_00_model_states.pt").write_bytes(b"model" * 100)
        (d / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"optim" * 100)


def test_verification_catches_truncation_and_same_size_damage(tmp_path: Path) -> None:
    """Claim (docs/slurm.md: resume verifies sizes + sha256; a damaged newest checkpoint is
    skipped): a truncated file fails the size check, a same-size flipped byte fails only the
    sha256 check, and the resume picks the previous tag."""
    for damage in ("truncate", "flip"):
        root = tmp_path / damage / "checkpoints"
        ckpt.save(FilesEngine(), root, 10, {}, keep_last=3)
        newest = ckpt.save(FilesEngine(), root, 20, {}, keep_last=3)
        assert ckpt.verify(newest) is None
        f = newest / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
        data = f.read_bytes()
        f.write_bytes(data[:-1] if damage == "truncate" else data[:-1] + b"X")
        problem = ckpt.verify(newest)
        assert problem is not None and f.name in problem
        assert ("size" if damage == "truncate" else "sha256") in problem
        if damage == "flip":
            assert ckpt.verify(newest, checksum=False) is None  # verify: size cannot see it
        assert choose_checkpoint(root, "auto", rank=0) == root / "step0000010"


def test_restore_puts_the_loader_at_the_saved_position(data_corpus) -> None:
    """Claim (exact resume): a resumed trainer's loader draws exactly the batch the uninterrupted
    loader draws next, and its counters are the saved ones (``TrainState`` of a checkpoint's client
    state: the trainer's state components, saved and loaded as one)."""
    cfg = DataConfig(shards=str(data_corpus.shards_dir))
    run = build_train_loader(cfg, 8, 4)
    for _ in range(3):
        run.next_step()
    spike_cfg = SpikeConfig(action="skip")

    def state_of(loader: Any, progress: Progress) -> TrainState:
        return TrainState(progress, {"data": loader, "consumed": ConsumedRecord(Path("."), enabled=False),
                                     "spikes": SpikeDetector(spike_cfg)}, model_hash="m", data_fingerprint="f")

    client = state_of(run, Progress(step=3, tokens_seen=24 * 64, flops_seen=1.0)).state_dict()
    assert tuple(client) == CLIENT_KEYS
    resumed = Progress()
    fresh = build_train_loader(cfg, 8, 4)
    state_of(fresh, resumed).load_state_dict(client, Path("step0000003"))
    assert resumed == Progress(step=3, tokens_seen=24 * 64, flops_seen=1.0)
    want, got = run.next_step(), fresh.next_step()
    assert all(torch.equal(a["sample_ids"], b["sample_ids"]) for a, b in zip(want, got, strict=True))
    with pytest.raises(ConfigError, match="step0000003"):  # another model's checkpoint: refused before loading
        state_of(fresh, Progress()).load_state_dict({**client, "model_hash": "other"}, Path("step0000003"))
    run.close()
    fresh.close()


# ---------------------------------------------------------------------------- KL early exit
def test_cached_decoding_with_loop_counts_stops_the_batch_at_the_first_converged_iteration() -> None:
    """Claim: with a cache and explicit ``loop_counts`` the batch stops as a whole at the first
    iteration whose KL to the previous one is below ``early_exit_kl`` for every row (a huge
    threshold: after iteration 2, the first with a previous one; a tiny one: never early).
    ``init_std=0.5`` makes every iteration move the output (KL ~0.2-6 nats): at the default init
    the tiny model's iterations differ by fp32 noise (|KL| ~1e-7, either sign), so "never early"
    would depend on the machine's rounding."""
    prompt = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))
    counts = torch.tensor([6, 6])
    torch.manual_seed(0)
    model = mythos.build_model(tiny(early_exit_kl=1e9, init_std=0.5)).eval()
    with torch.no_grad():
        assert model(prompt, cache=KVCache(), loop_counts=counts).aux["loops_run"].item() == 2.0
        model.cfg.early_exit_kl = 1e-12
        assert model(prompt, cache=KVCache(), loop_counts=counts).aux["loops_run"].item() == 6.0
        # at 2 nats the rows converge at different iterations (KL after iteration 3: 3.6 and 1.8,
        # after 4: 0.8 and 5.8, after 5: 1.6 and 0.4): the batch waits for both
        model.cfg.early_exit_kl = 2.0
        assert model(prompt, cache=KVCache(), loop_counts=counts).aux["loops_run"].item() == 5.0
