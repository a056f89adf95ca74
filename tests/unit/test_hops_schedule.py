"""The ``hops`` loop schedule (issue 14): an RDT trained on a multi-hop task runs each sample
``T = hops + hops_offset`` iterations. The hop counts travel from the task generator through the
shards' manifest (part of the data hash) and the data order to the loop layout, and the multi-hop
eval runs each query at its own ``T``."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mythos.config import ConfigError, from_dict
from mythos.data import DataConfig, build_train_loader, load_manifest
from mythos.data.format import DataFormatError, data_hash
from mythos.eval.multihop import evaluate_multihop
from mythos.model import build_model
from mythos.model.config import LoopConfig, ModelConfig
from mythos.model.loops import expected_loops, sample_loop_counts
from mythos.tasks import TaskConfig, WordVocab, build_task, generate, load_test_examples
from mythos.train.checks import check_run
from mythos.train.config import load_run_config
from mythos.train.loop_layout import LoopLayout

CHAIN = dict(kind="khop", seed=1, n_entities=12, n_relations=1, train_per_hop=40, val_per_hop=1, test_per_hop=4,
             fact_repeats=4, test_hops=[1, 2, 3, 5, 6, 9])
HOPS = LoopConfig(schedule="hops", hops_offset=1, mean=2.5, bwd_depth=0, max_loops=8)


@pytest.fixture(scope="module")
def chain_task(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("chain")
    build_task(TaskConfig(**CHAIN), out)
    return out


def test_counts_are_hops_plus_offset_and_need_hops() -> None:
    hops = torch.tensor([1, 5, 3, 9])
    assert sample_loop_counts(HOPS, 0, 0, 4, hops).tolist() == [2, 6, 4, 8]  # 9 + 1 capped at max_loops
    assert sample_loop_counts(replace(HOPS, hops_offset=0), 0, 0, 4, hops).tolist() == [1, 5, 3, 8]
    with pytest.raises(ValueError, match="needs every sample's hop count"):
        sample_loop_counts(HOPS, 0, 0, 4)
    with pytest.raises(ValueError, match=r"shape \[3\]"):
        sample_loop_counts(HOPS, 0, 0, 3, hops)
    assert expected_loops(HOPS) == (2.5, 2.5)  # the planning estimate: loops.mean


def test_uniform_counts_have_a_floor_and_ignore_the_data() -> None:
    """``uniform``: T ~ U{min_loops..max_loops} per sequence, every value drawn, a pure function of
    (seed, step) -- the hop counts play no part."""
    cfg = LoopConfig(schedule="uniform", min_loops=6, max_loops=12, mean=9, bwd_depth=0)
    t = sample_loop_counts(cfg, 1, 3, 4096)
    assert int(t.min()) == 6 and int(t.max()) == 12 and set(t.tolist()) == set(range(6, 13))
    assert t.float().mean().item() == pytest.approx(9.0, abs=0.15)
    assert torch.equal(t, sample_loop_counts(cfg, 1, 3, 4096, torch.ones(4096, dtype=torch.long)))
    assert not torch.equal(t, sample_loop_counts(cfg, 1, 4, 4096))
    assert expected_loops(cfg)[0] == pytest.approx(9.0, abs=0.05)
    with pytest.raises(ValueError, match="min_loops"):
        LoopConfig(schedule="uniform", min_loops=13, max_loops=12).validate()


def test_the_chain_rdt_is_never_told_the_depth() -> None:
    """configs/run/rdt-chain.yaml trains with loop counts independent of the hops, every one at
    least the deepest training query + 1 (configs/tasks/multihop-chain.yaml: 5 hops)."""
    from mythos.config import load_config

    task = load_config(TaskConfig, "configs/tasks/multihop-chain.yaml")
    loops = load_run_config("configs/run/rdt-chain.yaml").model.loops
    assert loops.schedule != "hops"
    assert int(sample_loop_counts(loops, 1, 0, 10_000).min()) >= task.train_max_hops + 1
    assert task.test_count(6) >= 48 and all(task.test_count(k) >= 48 for k in task.test_hops if k > 5)


def test_task_shards_record_hops_in_the_data_hash(chain_task: Path, tmp_path: Path) -> None:
    data = generate(TaskConfig(**CHAIN))
    manifest = load_manifest(chain_task / "shards")
    for split in ("train", "val"):
        assert manifest.sample_hops(split).tolist() == [ex.hops for ex in data.splits[split]]
    raw = json.loads((chain_task / "shards" / "manifest.json").read_text())
    changed = json.loads(json.dumps(raw))
    changed["sample_hops"]["train"][0] += 1
    assert data_hash(changed) != data_hash(raw)  # hop counts are data: a change is a different dataset
    changed["sample_hops"]["train"] = changed["sample_hops"]["train"][:-1]
    bad = tmp_path / "manifest.json"
    bad.write_text(json.dumps(changed))
    with pytest.raises(DataFormatError, match=r"sample_hops\['train'\] has \d+ entries for \d+ samples") as exc:
        load_manifest(bad)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("world", [1, 2])
def test_layout_gives_each_sample_its_own_hops_plus_offset(chain_task: Path, world: int) -> None:
    """Every delivered row's T equals its *sample's* hop count + 1 (looked up by global position),
    on 1 and 2 ranks, across an epoch boundary; micro-batches are grouped by T."""
    cfg = from_dict(DataConfig, {"shards": str(chain_task / "shards"), "seed": 3})
    hops = load_manifest(chain_task / "shards").sample_hops("train")
    batch, micro = 32, 8
    seen: dict[int, list[int]] = {}
    for rank in range(world):
        loader = build_train_loader(cfg, batch, micro, rank, world)
        layout = LoopLayout(HOPS, 0, batch, micro, world, lockstep=False, step_hops=loader.step_hops())
        loader.use_layout(layout)
        steps = loader.steps_per_epoch + 2
        for step in range(steps):
            counts = layout.counts(step)
            for mb in loader.next_step():
                t = counts[mb["positions"]]
                assert t.tolist() == (hops[mb["sample_ids"].numpy()] + 1).tolist()
                assert t.tolist() == sorted(t.tolist(), reverse=True)  # grouped by T
                seen.setdefault(step, []).extend(mb["sample_ids"].tolist())
    # together the ranks ran each step's whole global batch once
    ref = build_train_loader(cfg, batch, batch, 0, 1)
    for step in sorted(seen):
        assert sorted(seen[step]) == sorted(ref.next_step()[0]["sample_ids"].tolist())


def test_hops_schedule_refused_on_data_without_hops(chain_task: Path, tmp_path: Path) -> None:
    hops = ["model.loops.schedule=hops", "model.loops.hops_offset=1"]  # the oracle schedule (not rdt-chain's)
    cfg = load_run_config("configs/run/rdt-chain.yaml", [f"data.shards={chain_task / 'shards'}", "train.max_steps=2",
                                                         *hops])
    assert check_run(cfg, 2)["train_samples"] > 0
    raw = json.loads((chain_task / "shards" / "manifest.json").read_text())
    del raw["sample_hops"]
    plain = tmp_path / "shards"
    plain.mkdir()
    for f in (chain_task / "shards").iterdir():
        (plain / f.name).symlink_to(f)
    (plain / "manifest.json").unlink()
    (plain / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="schedule=hops needs each sample's hop count") as exc:
        check_run(load_run_config("configs/run/rdt-chain.yaml", [f"data.shards={plain}", "train.max_steps=2",
                                                                 *hops]), 2)
    assert "\n" not in str(exc.value)


def test_multihop_eval_runs_each_query_at_hops_plus_offset(chain_task: Path) -> None:
    """With answers defined as the model's own greedy output at T = hops + 1, the ``hops+1``
    setting scores 1.0 on every hop count -- also where queries of different hop counts share a
    batch (same prompt length) -- while a fixed T does not."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(kind="rdt", vocab_size=32, d_model=32, n_heads=2, max_seq_len=32,
                                    n_core=1, loops=HOPS, zero_init_out=False, init_std=0.3)).eval()
    g = torch.Generator().manual_seed(1)
    examples = []
    for i in range(24):
        prompt = torch.randint(3, 32, (5 + i % 2,), generator=g).tolist()  # two lengths, hops mixed in each
        hops = 1 + i % 4
        with torch.no_grad():
            ans = model.generate(torch.tensor([prompt]), 1, num_loops=hops + 1)[0, -1:].tolist()
        examples.append({"hops": hops, "prompt_ids": prompt, "answer_ids": ans})
    res = evaluate_multihop(model, examples, loops=[1, 3], hops_offsets=[1], batch_size=64)
    assert res["accuracy"]["hops+1"] == {"1": 1.0, "2": 1.0, "3": 1.0, "4": 1.0}
    assert res["accuracy"]["3"]["2"] == 1.0 and min(res["accuracy"]["1"].values()) < 1.0


def test_single_relation_floor_is_the_best_fixed_trained_depth(chain_task: Path) -> None:
    card = json.loads((chain_task / "task.json").read_text())
    vocab = WordVocab(card["words"])
    pi = card["structure"]["relations"][0]
    tests = load_test_examples(chain_task)
    for hops, floor in card["structure"]["floor"].items():
        qs = [(int(vocab.decode(e["prompt_ids"][1:2])[0][1:]), vocab.decode(e["answer_ids"])[0])
              for e in tests if e["hops"] == int(hops)]
        best = 0.0
        for j in range(1, 6):  # answer pi^j(start) for every query
            hit = 0
            for start, answer in qs:
                x = start
                for _ in range(j):
                    x = pi[x]
                hit += f"E{x}" == answer
            best = max(best, hit / len(qs))
        assert floor == pytest.approx(best), hops
    assert card["structure"]["floor"]["5"] == 1.0 and min(card["structure"]["floor"].values()) < 1.0


def test_val_loss_of_a_hops_model_runs_each_sample_at_its_hops(chain_task: Path) -> None:
    """The trainer's / mythos.eval's default val loss of a ``hops`` model is the token-weighted loss
    of every val sample run alone at T = its hops + 1 (padding rows of the last batch included)."""
    from mythos.data import build_val_loader
    from mythos.train.evaluate import evaluate

    torch.manual_seed(0)
    mcfg = ModelConfig(kind="rdt", vocab_size=32, d_model=32, n_heads=2, max_seq_len=32, n_core=1, loops=HOPS,
                       zero_init_out=False, init_std=0.3)
    model = build_model(mcfg).eval()
    cfg = from_dict(DataConfig, {"shards": str(chain_task / "shards")})
    val = build_val_loader(cfg, 3)
    hops = load_manifest(chain_task / "shards").sample_hops("val")
    assert len(hops) == 4 and len(set(hops.tolist())) > 1  # 2 batches, the second padded; mixed hop counts
    res = evaluate(model, lambda: iter(val), mcfg, torch.device("cpu"), loops=[1])
    ce, n = 0.0, 0
    for batch in build_val_loader(cfg, 1):
        with torch.no_grad():
            out = model(batch["input_ids"], labels=batch["labels"], num_loops=int(batch["hops"][0]) + 1)
        ce, n = ce + float(out.ce_sum), n + int(out.n_tokens)
    assert res["val/loss"] == pytest.approx(ce / n, rel=1e-5)
    assert res["val/loss@1"] != pytest.approx(res["val/loss"], rel=1e-3) and "val/loss@hops+1" not in res
