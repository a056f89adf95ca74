"""The multi-hop section of mythos.tools.experiment_report on synthetic eval results: the RDT's adaptive
exit is the primary row (accuracy and chosen T per hop, recomputed here), the oracle T = hops + 1
row is labelled an upper bound and never primary, the fixed-T sweep and every dense baseline
(iso-parameters, iso-depth) are reported with seed bands, and mismatched test sets are refused."""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path
from typing import Any

import pytest

from mythos.tools.experiment_multihop import (
    load_multihop_arms,
    multihop_console_lines,
    multihop_lines,
    multihop_summary,
)
from mythos.tools.experiment_plots import plot_multihop
from mythos.tools.runs import CompareError

HOPS = [str(h) for h in range(1, 9)]
TRAIN_HOPS = 5
SEEDS = (1, 2, 3)
RDT_KEYS = ["1", "4", "8", "16", "hops+1", "exit-kl0.001"]


def _run(path: Path, name: str, kind: str, seed: int, mh: dict[str, Any]) -> Path:
    """A run directory with what load_run / data_check read, and a multihop eval section."""
    path.mkdir(parents=True)
    (path / "run_info.json").write_text(json.dumps({"name": name, "kind": kind, "params": 100, "data_hash": "d" * 64,
                                                    "data_fingerprint": "m" * 64, "start_time": 0.0}))
    (path / "config.resolved.yaml").write_text(f"name: {name}\ntrain:\n  seed: {seed}\n")
    (path / "metrics.jsonl").write_text(json.dumps({"step": 10, "time": 1.0, "train/loss": 1.0}) + "\n")
    (path / "consumed.jsonl").write_text(json.dumps({"step": 10, "samples": 80, "sha": "m10"}) + "\n")
    (path / "eval").mkdir()
    (path / "eval" / "results.json").write_text(json.dumps({"params": 66_000 if kind == "rdt" else 70_000,
                                                            "multihop": mh}))
    return path


@pytest.fixture()
def arms(tmp_path: Path) -> dict[str, Any]:
    rng = random.Random(0)
    out: dict[str, Any] = {"paths": {k: [] for k in "abc"}, "mh": {k: [] for k in "abc"}}
    for seed in SEEDS:
        for arm, name, kind, keys in (("a", "rdt-chain", "rdt", RDT_KEYS),
                                      ("b", "dense-chain-l1", "dense", ["default"]),
                                      ("c", "dense-chain-l11", "dense", ["default"])):
            mh = {"task": "khop", "data_hash": "t" * 64, "test_sha256": "s" * 64, "train_hops": list(range(1, 6)),
                  "chance": 1 / 64, "count": dict.fromkeys(HOPS, 48), "floor": dict.fromkeys(HOPS, 0.02),
                  "accuracy": {k: {h: round(rng.random(), 4) for h in HOPS} for k in keys}}
            if kind == "rdt":
                mh["exit_loops"] = {"exit-kl0.001": {h: round(2 + rng.random() * 10, 3) for h in HOPS}}
                mh["exit_max_loops"] = 32
            out["mh"][arm].append(mh)
            out["paths"][arm].append(str(_run(tmp_path / f"{name}-s{seed}", name, kind, seed, mh)))
    return out


def _summary(arms: dict[str, Any]) -> dict[str, Any]:
    runs, _ = load_multihop_arms(arms["paths"]["a"], [arms["paths"]["b"], arms["paths"]["c"]], TRAIN_HOPS)
    return multihop_summary(runs, TRAIN_HOPS)


def test_adaptive_exit_is_primary_and_the_oracle_only_an_upper_bound(arms: dict[str, Any], tmp_path: Path) -> None:
    mh = _summary(arms)
    assert mh["arms"] == ["a", "b", "c"] and mh["unseen_hops"] == ["6", "7", "8"]
    a = mh["a"]
    assert a["in_distribution"]["key"] == "exit-kl0.001" and a["exit_keys"] == ["exit-kl0.001"]
    acc = [m["accuracy"]["exit-kl0.001"] for m in arms["mh"]["a"]]
    want = [statistics.fmean(x[h] for h in HOPS[:TRAIN_HOPS]) for x in acc]
    assert a["in_distribution"]["per_seed"] == pytest.approx(want)
    row = a["rows"][0]
    for h in HOPS:  # chosen T: seed mean and band of each seed's mean T
        ts = [m["exit_loops"]["exit-kl0.001"][h] for m in arms["mh"]["a"]]
        assert row["chosen_T"][h]["mean"] == pytest.approx(statistics.fmean(ts))
        assert (row["chosen_T"][h]["min"], row["chosen_T"][h]["max"]) == (min(ts), max(ts))
    oracle = next(r for r in a["rows"] if r["key"] == "hops+1")
    assert oracle["oracle"] and "oracle upper bound" in oracle["label"] and a["rows"][-1] is not row
    assert a["rows"][-1]["key"] == "hops+1"  # listed last
    assert sorted(a["fixed_T"], key=int) == ["1", "4", "8", "16"]
    for key in "bc":
        assert mh[key]["in_distribution"]["key"] == "default" and len(mh[key]["seeds"]) == 3
    text = "\n".join(multihop_lines(mh))
    assert "oracle upper bound: T = hops+1 per query (told the depth)" in text
    assert "| c | dense-chain-l11 (70,000 params) | default | seed 3 |" in text
    assert "| (oracle) | T = hops + 1 | 2 | 3 |" in text and "mean T chosen" in text
    assert "| 16 |" in text  # the fixed-T sweep table
    assert any("dense-chain-l11" in ln for ln in multihop_console_lines(mh))
    plot_multihop(mh, tmp_path / "mh.png")
    assert (tmp_path / "mh.png").stat().st_size > 10_000


def test_without_an_exit_the_best_fixed_t_is_primary_never_the_oracle(arms: dict[str, Any]) -> None:
    for m in arms["mh"]["a"]:
        del m["accuracy"]["exit-kl0.001"]
    for p, m in zip(arms["paths"]["a"], arms["mh"]["a"]):
        (Path(p) / "eval" / "results.json").write_text(json.dumps({"multihop": m}))
    mh = _summary(arms)
    assert mh["a"]["in_distribution"]["key"] == mh["a"]["best_fixed_key"] != "hops+1"


@pytest.mark.parametrize("field", ["test_sha256", "count"])
def test_a_different_test_set_is_refused(arms: dict[str, Any], field: str) -> None:
    bad = Path(arms["paths"]["c"][2]) / "eval" / "results.json"
    obj = json.loads(bad.read_text())
    obj["multihop"][field] = "x" * 64 if field == "test_sha256" else dict.fromkeys(HOPS, 47)
    bad.write_text(json.dumps(obj))
    with pytest.raises(CompareError, match="multihop test sets differ"):
        _summary(arms)


def test_a_dense_baseline_with_other_seeds_is_refused(arms: dict[str, Any]) -> None:
    with pytest.raises(CompareError, match=r"arm c as arm b\): 3 runs in arm a but 2 in arm b"):
        load_multihop_arms(arms["paths"]["a"], [arms["paths"]["b"], arms["paths"]["c"][:2]], TRAIN_HOPS)
