"""mythos.tasks: deterministic generators, correct answers, held-out test queries, loss-masked
shards that the ordinary loader reads, and exact-match scoring."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mythos.data import IGNORE_INDEX, DataConfig, Tokenizer, build_train_loader, build_val_loader, load_manifest
from mythos.tasks import TaskConfig, WordVocab, build_task, exact_match, generate, load_test_examples

SMALL = dict(train_per_hop=300, val_per_hop=8, test_per_hop=20, fact_repeats=2)


def _khop(**kw) -> TaskConfig:
    return TaskConfig(kind="khop", n_entities=12, n_relations=3, test_hops=[1, 2, 3, 6, 8], **{**SMALL, **kw})


def test_generators_are_deterministic_and_seeded() -> None:
    for cfg in (_khop(), TaskConfig(kind="pointer", n_nodes=6, test_hops=[1, 7], **SMALL)):
        a, b = generate(cfg), generate(cfg)
        assert a.splits == b.splits and a.structure == b.structure
        other = generate(TaskConfig(**{**cfg.__dict__, "seed": cfg.seed + 1}))
        assert other.splits["train"] != a.splits["train"]


def test_khop_answers_follow_the_graph_and_test_queries_are_unseen() -> None:
    data = generate(_khop())
    rel = data.structure["relations"]  # rel[r][e] = e'
    for split in data.splits.values():
        for ex in split:
            entity = int(ex.prompt[0][1:])
            for r in ex.prompt[1:-1]:
                entity = rel[int(r[1:])][entity]
            assert ex.answer == (f"E{entity}",) and ex.hops == len(ex.prompt) - 2 and ex.prompt[-1] == "="
    train = {ex.prompt for ex in data.splits["train"]}
    multi = [ex for ex in data.splits["test"] + data.splits["val"] if ex.hops >= 2]
    assert multi and not any(ex.prompt in train for ex in multi)
    assert {ex.hops for ex in data.splits["train"]} == {1, 2, 3, 4, 5}
    assert sorted({ex.hops for ex in data.splits["test"]}) == [1, 2, 3, 6, 8]


def test_pointer_answers_chase_the_listed_permutation() -> None:
    data = generate(TaskConfig(kind="pointer", n_nodes=6, test_hops=[1, 4, 9], **SMALL))
    for ex in data.splits["test"]:
        sep = ex.prompt.index(";")
        pairs = dict(zip(ex.prompt[:sep:2], ex.prompt[1:sep:2]))
        node = ex.prompt[sep + 1]
        assert ex.prompt[sep + 2 : -1] == (">",) * ex.hops
        for _ in range(ex.hops):
            node = pairs[node]
        assert ex.answer == (node,)


def test_bad_config_is_one_line_error() -> None:
    with pytest.raises(ValueError, match="unused 2-hop queries"):
        generate(TaskConfig(kind="khop", n_entities=3, n_relations=1, test_per_hop=50, test_hops=[2]))
    with pytest.raises(ValueError, match="test_per_unseen_hop"):
        generate(_khop(test_per_unseen_hop=-1))


def test_unseen_hops_get_their_own_test_count_deterministically(tmp_path: Path) -> None:
    """``test_per_unseen_hop`` sizes only the hop counts above train_max_hops (the chain task: 64
    distinct queries per hop count, so trained hops hold out few and unseen hops many); the
    queries stay distinct and unseen, generation is deterministic, and the count is part of the
    data (the data hash changes with it)."""
    chain = dict(kind="khop", seed=1, n_entities=16, n_relations=1, train_per_hop=30, val_per_hop=1,
                 test_per_hop=3, fact_repeats=2, test_hops=[1, 2, 5, 6, 9])
    cfg = TaskConfig(**chain, test_per_unseen_hop=14)
    data = generate(cfg)
    per_hop = {k: [ex.prompt for ex in data.splits["test"] if ex.hops == k] for k in cfg.test_hops}
    assert {k: len(v) for k, v in per_hop.items()} == {1: 3, 2: 3, 5: 3, 6: 14, 9: 14}
    assert all(len(set(v)) == len(v) for v in per_hop.values())
    train = {ex.prompt for ex in data.splits["train"]}
    assert not any(p in train for k, v in per_hop.items() if k > 1 for p in v)
    assert generate(cfg).splits == data.splits
    assert generate(TaskConfig(**chain)).splits["test"] != data.splits["test"]  # 0 = test_per_hop
    hashes = [build_task(c, tmp_path / str(i))["data_hash"] for i, c in enumerate([cfg, TaskConfig(**chain)])]
    assert hashes[0] != hashes[1]


def test_word_vocab_is_a_real_sentencepiece_model(tmp_path: Path) -> None:
    vocab = WordVocab(["E0", "E1", "R0", "="])
    path = tmp_path / "tokenizer.model"
    path.write_bytes(vocab.sentencepiece_model())
    tok = Tokenizer(path)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (8, 1, 2, 3)
    assert tok.encode("E1 R0 = E0") == vocab.encode(["E1", "R0", "=", "E0"])
    assert tok.decode(vocab.encode(["E1", "R0"])) == "E1 R0"
    assert vocab.sentencepiece_model() == WordVocab(["E0", "E1", "R0", "="]).sentencepiece_model()


def test_task_shards_train_on_the_answer_only(tmp_path: Path) -> None:
    cfg = _khop()
    card = build_task(cfg, tmp_path / "a")
    build_task(cfg, tmp_path / "b")  # same config -> byte-identical data
    assert json.loads((tmp_path / "b" / "task.json").read_text())["data_hash"] == card["data_hash"]
    man = load_manifest(tmp_path / "a" / "shards")
    assert man.loss_mask and man.data_hash == card["data_hash"]
    loader = build_train_loader(DataConfig(shards=str(tmp_path / "a" / "shards")), 8, 4)
    for micro in loader.next_step():
        labels, ids = micro["labels"], micro["input_ids"]
        targets = labels != IGNORE_INDEX
        assert (targets.sum(1) == 1).all()  # exactly the one answer token per query
        eq = (ids == 4 + card["words"].index("=")).nonzero()  # the answer follows "="
        assert torch_equal(eq[:, 1], targets.nonzero()[:, 1])
    val = next(iter(build_val_loader(DataConfig(shards=str(tmp_path / "a" / "shards")), 4)))
    assert ((val["labels"] != IGNORE_INDEX).sum(1) == 1).all()
    tests = load_test_examples(tmp_path / "a")
    assert len(tests) == 5 * cfg.test_per_hop and all(t["prompt_ids"][0] == 1 for t in tests)


def torch_equal(a, b) -> bool:
    return a.tolist() == b.tolist()


def test_exact_match() -> None:
    assert exact_match([5], [5]) and exact_match([5, 7, 9], [5, 7])
    assert not exact_match([5], [6]) and not exact_match([5], [5, 7]) and not exact_match([], [1])
