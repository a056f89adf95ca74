"""mythos.data: world-size/worker invariance, exactly-once coverage, exact resume, multi-epoch,
shard verification, fingerprints, validation sharding, config."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep.demo_corpus import SmallCorpus
from mythos.config import ConfigError, from_dict, load_config
from mythos.data import (
    IGNORE_INDEX,
    DataConfig,
    DataFormatError,
    PackedSamples,
    build_train_loader,
    build_val_loader,
    load_manifest,
)

B = 64  # global batch; the test corpus has ~6.4k train samples -> ~99 steps per epoch


def cfg_for(corpus: SmallCorpus, **kw) -> DataConfig:
    return DataConfig(shards=str(corpus.shards_dir), **kw)


def global_batches(cfg: DataConfig, world: int, micro: int, steps: int, state=None) -> list[torch.Tensor]:
    """Run ``world`` rank loaders side by side; return each step's global batch ``[B, L+1]``
    (ranks concatenated in order, each row = input_ids + last label)."""
    loaders = [build_train_loader(cfg, B, micro, r, world) for r in range(world)]
    if state is not None:
        for ld in loaders:
            ld.load_state_dict(state)
    out = []
    for _ in range(steps):
        rows = []
        for ld in loaders:
            for mb in ld.next_step():
                assert mb["input_ids"].dtype == torch.long and mb["input_ids"].shape == (micro, ld.seq_len)
                assert torch.equal(mb["input_ids"][:, 1:], mb["labels"][:, :-1])
                rows.append(torch.cat([mb["input_ids"], mb["labels"][:, -1:]], dim=1))
        out.append(torch.cat(rows))
    states = [ld.state_dict() for ld in loaders]
    assert all(s == states[0] for s in states)  # every rank agrees on the position
    for ld in loaders:
        ld.close()
    return out


@pytest.fixture(scope="module")
def sample_ids(data_corpus: SmallCorpus) -> dict[bytes, int]:
    """Content -> global train index (packed samples of real text are unique; checked)."""
    s = PackedSamples(load_manifest(data_corpus.shards_dir), "train")
    ids = {s[g].astype(np.int64).tobytes(): g for g in range(len(s))}
    assert len(ids) == len(s)
    return ids


def ids_of(batch: torch.Tensor, sample_ids: dict[bytes, int]) -> list[int]:
    return [sample_ids[row.numpy().astype(np.int64).tobytes()] for row in batch]


def test_identical_global_batches_for_world_size_1_2_4(data_corpus) -> None:
    cfg = cfg_for(data_corpus)
    ref = global_batches(cfg, world=1, micro=16, steps=4)
    for world, micro in ((2, 8), (4, 4), (4, 16)):
        got = global_batches(cfg, world, micro, steps=4)
        assert all(torch.equal(a, b) for a, b in zip(ref, got)), (world, micro)


def test_two_ranks_two_workers_each_sample_once_per_epoch(data_corpus, sample_ids) -> None:
    cfg = cfg_for(data_corpus, num_workers=2)
    loaders = [build_train_loader(cfg, B, 8, r, 2) for r in range(2)]
    n, steps = loaders[0].num_train_samples, loaders[0].steps_per_epoch
    assert steps == n // B
    seen: list[int] = []
    for _ in range(steps):
        for ld in loaders:
            for mb in ld.next_step():
                seen += ids_of(torch.cat([mb["input_ids"], mb["labels"][:, -1:]], 1), sample_ids)
    assert len(seen) == len(set(seen)) == steps * B  # nothing duplicated; only the tail is dropped
    assert loaders[0].state_dict()["epoch"] == 1
    # and workers do not change the order: same as a worker-less single rank
    ref = global_batches(cfg_for(data_corpus), world=1, micro=B, steps=steps)
    assert seen == [i for b in ref for i in ids_of(b, sample_ids)]
    for ld in loaders:
        ld.close()


def test_exact_resume_mid_epoch_onto_other_world_size(data_corpus) -> None:
    cfg = cfg_for(data_corpus)
    straight = global_batches(cfg, world=1, micro=32, steps=10)
    first = build_train_loader(cfg, B, 8, 1, 2)
    for _ in range(6):
        first.next_step()
    state = first.state_dict()
    assert (state["epoch"], state["offset"], state["samples_consumed"]) == (0, 6 * B, 6 * B)
    assert state["tokens_consumed"] == 6 * B * first.seq_len
    resumed = global_batches(cfg, world=4, micro=4, steps=4, state=state)
    assert all(torch.equal(a, b) for a, b in zip(straight[6:], resumed))
    resumed_w = global_batches(cfg_for(data_corpus, num_workers=2), world=2, micro=16, steps=4, state=state)
    assert all(torch.equal(a, b) for a, b in zip(straight[6:], resumed_w))


def test_multi_epoch_new_permutation_and_drop_last(data_corpus, sample_ids) -> None:
    cfg = cfg_for(data_corpus)
    big = 1024
    ld = build_train_loader(cfg, big, 256, 0, 1)
    spe = ld.steps_per_epoch
    assert spe == ld.num_train_samples // big
    epochs: list[list[int]] = []
    for step in range(2 * spe + 1):
        if step % spe == 0:
            epochs.append([])
        ids = [
            i
            for mb in ld.next_step()
            for i in ids_of(torch.cat([mb["input_ids"], mb["labels"][:, -1:]], 1), sample_ids)
        ]
        epochs[-1] += ids
    assert ld.epoch == 2 and ld.state_dict()["offset"] == big
    for e in epochs[:2]:
        assert len(e) == len(set(e)) == spe * big
    assert epochs[0] != epochs[1]  # a fresh permutation per epoch
    # resuming at an epoch boundary continues in the next epoch
    again = build_train_loader(cfg, big, 256, 0, 1)
    for _ in range(spe):
        again.next_step()
    assert again.state_dict()["epoch"] == 1 and again.state_dict()["offset"] == 0


def test_unshuffled_order_is_stored_order(data_corpus) -> None:
    m = load_manifest(data_corpus.shards_dir)
    s = PackedSamples(m, "train")
    (batch,) = global_batches(cfg_for(data_corpus, shuffle=False), world=2, micro=8, steps=1)
    np.testing.assert_array_equal(batch.numpy(), np.stack([s[g] for g in range(B)]).astype(np.int64))


def test_state_mismatch_errors(data_corpus, tmp_path) -> None:
    cfg = cfg_for(data_corpus)
    ld = build_train_loader(cfg, B, 8, 0, 1)
    ld.next_step()
    state = ld.state_dict()
    with pytest.raises(ConfigError, match="seed=0 but data.seed=1"):
        build_train_loader(cfg_for(data_corpus, seed=1), B, 8).load_state_dict(state)
    with pytest.raises(ConfigError, match="saved for data"):
        build_train_loader(cfg, B, 8).load_state_dict({**state, "data_hash": "0" * 64})
    with pytest.raises(ConfigError, match="not divisible by world size 3"):
        build_train_loader(cfg, B, 8, 0, 3)
    with pytest.raises(ConfigError, match="micro batch size 5"):
        build_train_loader(cfg, B, 5, 0, 2)
    with pytest.raises(ConfigError, match="exceeds"):
        build_train_loader(cfg, 10**6, 10**6)


def test_fingerprint(data_corpus, tmp_path) -> None:
    cfg = cfg_for(data_corpus)
    a = build_train_loader(cfg, B, 8, 0, 1)
    b = build_train_loader(cfg_for(data_corpus, num_workers=1), B, 4, 1, 4)
    b.next_step()  # position does not matter
    assert a.fingerprint(100) == b.fingerprint(100)
    assert a.fingerprint() == a.fingerprint(cfg.fingerprint_samples)
    assert a.fingerprint(100) != a.fingerprint(99)
    assert a.fingerprint(100) != build_train_loader(cfg_for(data_corpus, seed=3), B, 8).fingerprint(100)
    # the same data under another path: same fingerprint (identity is content, not location)
    copy = tmp_path / "copy"
    shutil.copytree(data_corpus.shards_dir, copy)
    assert build_train_loader(DataConfig(shards=str(copy)), B, 8).fingerprint(100) == a.fingerprint(100)


@pytest.fixture
def shard_copy(data_corpus, tmp_path) -> Path:
    dst = tmp_path / "shards"
    shutil.copytree(data_corpus.shards_dir, dst)
    for p in dst.glob(".*.idx.npy"):
        p.unlink()
    return dst


def test_missing_truncated_corrupt_shard(shard_copy: Path) -> None:
    victim = shard_copy / "train-00001.tar"
    data = victim.read_bytes()
    victim.unlink()
    with pytest.raises(DataFormatError, match=r"train-00001\.tar is missing"):
        build_train_loader(DataConfig(shards=str(shard_copy), verify="none"), B, 8)
    victim.write_bytes(data[: len(data) // 2])
    for mode in ("full", "size"):
        with pytest.raises(DataFormatError, match=r"train-00001\.tar is \d+ bytes, manifest says"):
            build_train_loader(DataConfig(shards=str(shard_copy), verify=mode), B, 8)
    with pytest.raises(DataFormatError, match=r"train-00001\.tar"):  # no verify: the index catches it
        build_train_loader(DataConfig(shards=str(shard_copy), verify="none"), B, 8)
    corrupt = bytearray(data)
    corrupt[5000] ^= 0xFF
    victim.write_bytes(bytes(corrupt))
    with pytest.raises(DataFormatError, match=r"train-00001\.tar is corrupt: sha256"):
        build_train_loader(DataConfig(shards=str(shard_copy)), B, 8)
    build_train_loader(DataConfig(shards=str(shard_copy), verify="size"), B, 8)  # size-only: documented
    with pytest.raises(DataFormatError, match="no manifest.json"):
        build_train_loader(DataConfig(shards=str(shard_copy / "nowhere")), B, 8)


def test_corrupt_ids_under_verify_size_name_the_shard_and_sample(shard_copy: Path) -> None:
    """``verify: size`` cannot see flipped bytes at start-up; the per-sample check on every read
    must, once an id falls outside the vocabulary (the embedding lookup would crash naming nothing)."""
    manifest = load_manifest(shard_copy)
    clean = PackedSamples(manifest, "train", verify="size")
    k = next(i for i, r in enumerate(clean.readers) if r.path.name == "train-00001.tar")
    reader = clean.readers[k]
    reader.read(0)  # parses the .npy header length
    offset, _ = reader.index[7]
    at = int(offset) + reader._header + 2 * 10 + 1  # high byte of token 10 of sample 7 (uint16)
    victim = shard_copy / "train-00001.tar"
    data = bytearray(victim.read_bytes())
    data[at] = 0xFF  # id >= 65280 > vocab 1024; same size, so verify: size passes
    victim.write_bytes(bytes(data))
    clean.close()
    samples = PackedSamples(manifest, "train", verify="size")
    g = int(samples._starts[k]) + 7
    samples[g - 1]  # its neighbour still reads
    with pytest.raises(DataFormatError, match=r"train-00001\.tar: sample 7 has token id \d+ at position 10, past "
                                              r"the vocabulary \(1024\).*verify: full"):
        samples[g]
    # and through the training loader, whichever step reaches it
    ld = build_train_loader(DataConfig(shards=str(shard_copy), verify="size"), B, 8)
    with pytest.raises(DataFormatError, match=r"train-00001\.tar: sample 7"):
        for _ in range(ld.steps_per_epoch):
            ld.next_step()


def test_index_cache_is_written_and_reused(shard_copy: Path) -> None:
    cfg = DataConfig(shards=str(shard_copy))
    first = build_train_loader(cfg, B, 8).fingerprint(10)
    caches = sorted(shard_copy.glob(".*.idx.npy"))
    assert len(caches) == len(load_manifest(shard_copy).shards) - 1  # val not opened by the train loader
    assert build_train_loader(cfg, B, 8).fingerprint(10) == first


@pytest.mark.parametrize("world,batch", [(1, 32), (3, 16), (4, 64)])
def test_val_loader_covers_each_sample_once(data_corpus, world: int, batch: int) -> None:
    cfg = cfg_for(data_corpus)
    s = PackedSamples(load_manifest(data_corpus.shards_dir), "val")
    loaders = [build_val_loader(cfg, batch, r, world) for r in range(world)]
    assert len({len(v) for v in loaders}) == 1  # every rank runs the same number of batches
    rows = []
    for v in loaders:
        for mb in v:
            assert mb["input_ids"].shape == (batch, s.tokens_per_sample - 1)
            real = (mb["labels"] != IGNORE_INDEX).all(1)
            pad = (mb["labels"] == IGNORE_INDEX).all(1)
            assert bool((real | pad).all())
            rows += [torch.cat([i, lab[-1:]]) for i, lab, r in zip(mb["input_ids"], mb["labels"], real) if r]
    assert len(rows) == len(s) > 0
    np.testing.assert_array_equal(torch.stack(rows).numpy(), np.stack([s[g] for g in range(len(s))]))


def test_data_config_strict_loading(tmp_path) -> None:
    cfg = from_dict(DataConfig, {"shards": "data/demo/shards", "seed": 3, "verify": "size"})
    assert cfg.seed == 3 and cfg.verify == "size"
    with pytest.raises(ConfigError, match="verify"):
        from_dict(DataConfig, {"shards": "x", "verify": "sometimes"})
    with pytest.raises(ConfigError, match="unknown config key 'sede'"):
        from_dict(DataConfig, {"shards": "x", "sede": 1})
    with pytest.raises(ConfigError, match="num_workers"):
        from_dict(DataConfig, {"shards": "x", "num_workers": -1})
    repo_configs = Path(__file__).resolve().parents[2] / "configs" / "data"
    for yaml_file in sorted(repo_configs.glob("*.yaml")):
        load_config(DataConfig, yaml_file)
