"""Data mixtures: exact quotas, deterministic interleave, loader invariance/resume, per-source
accounting, strict config validation."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from data_prep.demo_corpus import SmallCorpus
from data_prep.shard import ShardParams, build_shards
from mythos.config import ConfigError, from_dict
from mythos.data import DataConfig, PackedSamples, build_train_loader, build_val_loader, load_manifest
from mythos.data.mixture import interleave, resolve_data, resolve_quotas, selection


@pytest.fixture(scope="module")
def sources(data_corpus: SmallCorpus, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three shard directories from disjoint plays (same tokenizer, seq_len 32), and one with
    another seq_len."""
    root = tmp_path_factory.mktemp("mix")
    files = data_corpus.text_files
    out = {}
    for name, chunk, seq_len in (
        ("a", files[0:3], 32),
        ("b", files[3:5], 32),
        ("c", files[5:6], 32),
        ("d", files[6:7], 16),
    ):
        p = ShardParams(seq_len=seq_len, shard_tokens=8192, val_fraction=0.05)
        build_shards(data_corpus.tokenizer_dir, chunk, root / name / "shards", p, progress=False)
        out[name] = root / name / "shards"
    return out


def mix_cfg(sources: dict[str, Path], weights: dict[str, float], **kw) -> DataConfig:
    raw = {"sources": [{"shards": str(sources[k]), "weight": w} for k, w in weights.items()], **kw}
    return from_dict(DataConfig, raw)


def test_quotas_are_exact_and_natural_size_never_repeats() -> None:
    sizes = [1000, 300, 50]
    for weights in ([0.7, 0.2, 0.1], [1, 1, 1], [3, 1e-3, 2.5]):
        q = resolve_quotas(weights, sizes)
        p = [Fraction(w) / sum(map(Fraction, weights)) for w in weights]
        total = int(q.sum())
        assert all(qi <= n for qi, n in zip(q, sizes))  # natural size: no source repeats
        assert any(Fraction(n) / pi < total + 1 for n, pi in zip(sizes, p))  # ... and it is the largest
        assert all(abs(qi - pi * total) < 1 for qi, pi in zip(q, p))  # largest remainder: within 1
    q = resolve_quotas([0.7, 0.2, 0.1], sizes, total=10_001)
    assert q.sum() == 10_001 and list(q) == [7001, 2000, 1000]  # .7*10001 = 7000.7 gets the spare sample
    with pytest.raises(ConfigError):
        resolve_quotas([1, 0], sizes[:2])


def test_interleave_is_exact_proportional_and_deterministic() -> None:
    q = [701, 200, 99]
    src = interleave(q)
    assert np.bincount(src).tolist() == q
    np.testing.assert_array_equal(src, interleave(q))
    # every prefix holds each source in proportion, within 1 sample
    cum = np.cumsum(np.eye(3, dtype=np.int64)[src], axis=0)
    k = np.arange(1, len(src) + 1)[:, None]
    assert np.abs(cum - k * np.array(q) / sum(q)).max() <= 1.0
    # a source short of its quota repeats every sample before any twice
    sel = selection(25, 10, seed=3, source=1)
    assert sorted(sel[:10]) == list(range(10)) and sorted(sel[10:20]) == list(range(10))


def test_mixture_loader_quotas_order_and_accounting(sources) -> None:
    weights = {"a": 0.6, "b": 0.3, "c": 0.1}
    cfg = mix_cfg(sources, weights, mixture_samples=4000)
    data = resolve_data(cfg)
    assert data.names == ("a", "b", "c") and data.quotas == (2400, 1200, 400)
    B = 40
    ld = build_train_loader(cfg, B, 10)
    assert ld.num_train_samples == 4000
    # one full epoch (4000 = 100 steps of 40): realised counts equal the quotas exactly
    for _ in range(ld.steps_per_epoch):
        ld.next_step()
    assert ld.samples_per_source() == {"a": 2400, "b": 1200, "c": 400}
    assert ld.tokens_per_source() == {"a": 2400 * 32, "b": 1200 * 32, "c": 400 * 32}
    assert sum(ld.tokens_per_source().values()) == ld.state_dict()["tokens_consumed"]

    # the mixture's samples really come from its sources, in the counts claimed
    parts = {k: PackedSamples(load_manifest(sources[k]), "train") for k in weights}
    mix = ld.samples
    for g in range(0, 4000, 397):
        s = int(mix.source_of[g])
        np.testing.assert_array_equal(mix[g], parts["abc"[s]][int(mix.local[g])])
    for s in range(len(weights)):  # natural-size quotas never repeat a sample of a source
        assert len(set(mix.local[mix.source_of == s].tolist())) == data.quotas[s]

    # deterministic and world-size invariant; the identity changes with the weights
    a, b = build_train_loader(cfg, B, 10), build_train_loader(cfg, B, 10, rank=1, world_size=2)
    assert a.fingerprint(200) == b.fingerprint(200)
    w1 = [m["input_ids"] for m in a.next_step()]
    w2 = [m["input_ids"] for m in build_train_loader(cfg, B, 10, rank=0, world_size=2).next_step()]
    w2 += [m["input_ids"] for m in b.next_step()]
    assert all((x == y).all() for x, y in zip(w1, w2))
    other = build_train_loader(mix_cfg(sources, {"a": 0.5, "b": 0.4, "c": 0.1}, mixture_samples=4000), B, 10)
    assert other.data_hash != a.data_hash and other.fingerprint(64) != a.fingerprint(64)


def test_mixture_resume_keeps_per_source_counts(sources) -> None:
    cfg = mix_cfg(sources, {"a": 2, "b": 1})
    ld = build_train_loader(cfg, 16, 8)
    for _ in range(37):
        ld.next_step()
    state = ld.state_dict()
    counts = ld.samples_per_source()
    assert sum(counts.values()) == 37 * 16 and set(counts) == {"a", "b"}
    resumed = build_train_loader(cfg, 16, 4, rank=1, world_size=2)
    resumed.load_state_dict(state)
    assert resumed.samples_per_source() == counts
    legacy = build_train_loader(cfg, 16, 8)
    legacy.load_state_dict({k: v for k, v in state.items() if k != "source_samples"})  # older checkpoints
    assert legacy.samples_per_source() == counts
    nxt = [m["input_ids"] for m in ld.next_step()]
    assert all((x == y["input_ids"]).all() for x, y in zip(nxt, legacy.next_step()))
    assert legacy.samples_per_source() == ld.samples_per_source()
    # a single directory reports itself as the one source
    single = build_train_loader(DataConfig(shards=str(sources["a"])), 16, 8)
    single.next_step()
    assert single.tokens_per_source() == {"shards": 16 * 32}


def test_mixture_val_and_validation_errors(sources) -> None:
    cfg = mix_cfg(sources, {"a": 1, "b": 1})
    val = build_val_loader(cfg, 8)
    n_val = sum(load_manifest(sources[k]).num_samples("val") for k in "ab")
    assert val.num_samples == n_val
    with pytest.raises(ConfigError, match="seq_len"):
        build_train_loader(mix_cfg(sources, {"a": 1, "d": 1}), 16, 8)
    bad = [
        ({"shards": str(sources["a"]), "sources": [{"shards": str(sources["b"]), "weight": 1}]}, "exactly one"),
        ({}, "exactly one"),
        ({"sources": [{"shards": str(sources["a"]), "weight": 0}]}, "positive"),
        ({"sources": [{"shards": str(sources["a"]), "weight": 1, "wieght": 2}]}, "unknown config key"),
        ({"sources": [{"shards": str(sources["a"]), "weight": 1}] * 2}, "distinct name"),
        ({"shards": str(sources["a"]), "mixture_samples": 10}, "needs sources"),
    ]
    for raw, needle in bad:
        with pytest.raises(ConfigError, match=needle):
            from_dict(DataConfig, raw)
    with pytest.raises(ConfigError, match="gets 0"):
        resolve_data(mix_cfg(sources, {"a": 1000, "c": 1e-6}))
