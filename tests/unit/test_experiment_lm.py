"""The LM half of the experiment report (mythos.tools.experiment_lm via mythos-experiment-report): the
ratio table against the cluster pair, matched-compute and matched-tokens comparisons at two sizes
with Welch intervals and verdicts, the loop-use check and the trend -- every number recomputed
here from the synthetic inputs."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import pytest
import yaml

from mythos.accounting import pair_ratios, ratio_flags
from mythos.config import to_dict
from mythos.model.build import load_model_config
from mythos.tools.experiment_lm import t95, welch_interval
from mythos.tools.experiment_report import main

SEEDS = (1, 2)
#: final val loss per (model, seed index); RDT loss-by-loops is built from it below
LOSS = {"rdt-analogue-s": [4.00, 4.04], "dense-analogue-s-compute": [3.90, 3.92],
        "dense-analogue-s-tokens": [3.98, 4.02], "rdt-analogue-m": [3.70, 3.72],
        "dense-analogue-m-compute": [3.72, 3.73], "dense-analogue-m-tokens": [3.80, 3.83]}
TOKENS = {"rdt": 1000.0, "compute": 1300.0, "tokens": 1000.0}
FLOPS_PER_TOKEN = {"s": {"rdt": 1.29e6, "dense": 1.0e6}, "m": {"rdt": 3.87e6, "dense": 3.0e6}}


def _write(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def make_run(root: Path, run: str, model: str, seed: int, tokens: float, flops_per_token: float,
             results: dict[str, Any]) -> Path:
    """A run directory as mythos-experiment-report reads it, with the preset's model config."""
    path = root / run
    cfg = load_model_config(model)
    params = 280_000 if cfg.kind == "rdt" else 470_000
    _write(path / "run_info.json", {"name": f"{model}-cpu", "kind": cfg.kind, "params": params, "data_hash": "d" * 64,
                                    "data_fingerprint": "f" * 64, "start_time": 0.0, "seq_len": 128})
    (path / "config.resolved.yaml").write_text(yaml.safe_dump({"name": f"{model}-cpu", "model": to_dict(cfg),
                                                               "train": {"seed": seed}}))
    rows = [{"step": s, "time": float(s), "train/loss": 6.0 - s / 50, "train/tokens": tokens * s / 10,
             "train/flops": tokens * s / 10 * flops_per_token} for s in range(1, 11)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "consumed.jsonl").write_text("".join(json.dumps({"step": s, "samples": s * 8, "sha": f"c{s}"}) + "\n"
                                                 for s in range(1, 11)))
    _write(path / "eval" / "results.json", results)
    return path


def rdt_by_loops(loss: float, gain: float = 0.1, extra2: float = 0.0, extra4: float = 0.0) -> dict[str, Any]:
    """Val loss per T: ``loss + gain`` at T=1, ``loss`` at T=8 (= E[T]), ``+ extra2`` at 16, ``+ extra4`` at 32."""
    return {"1": {"loss": loss + gain}, "8": {"loss": loss}, "16": {"loss": loss + extra2},
            "32": {"loss": loss + extra4}}


def plan(path: Path, size: str, match: str) -> Path:
    dense_tok = TOKENS[match]
    arms = [{"name": f"rdt-analogue-{size}-cpu", "kind": "rdt", "params": 280_000, "tokens": TOKENS["rdt"],
             "loops_expected": 8.0, "seq_len": 128, "model_flops": TOKENS["rdt"] * FLOPS_PER_TOKEN[size]["rdt"]},
            {"name": f"dense-analogue-{size}-cpu", "kind": "dense", "params": 470_000, "tokens": dense_tok,
             "seq_len": 128, "model_flops": dense_tok * FLOPS_PER_TOKEN[size]["dense"]}]
    _write(path, {"match": match, "description": f"same {match}", "arms": arms})
    return path


@pytest.fixture()
def exp(tmp_path: Path) -> dict[str, Any]:
    """Two sizes x (RDT, dense at matched compute, dense at matched tokens) x 2 seeds, and plans."""
    groups = []
    for size in ("s", "m"):
        rdt = f"rdt-analogue-{size}"
        a = [make_run(tmp_path, f"{rdt}-s{sd}", rdt, sd, TOKENS["rdt"], FLOPS_PER_TOKEN[size]["rdt"],
                      {"lm": {"loss": LOSS[rdt][i], "by_loops": rdt_by_loops(LOSS[rdt][i])}})
             for i, sd in enumerate(SEEDS)]
        for match in ("compute", "tokens"):
            key = f"dense-analogue-{size}-{match}"
            b = [make_run(tmp_path, f"{key}-s{sd}", f"dense-analogue-{size}", sd, TOKENS[match],
                          FLOPS_PER_TOKEN[size]["dense"], {"lm": {"loss": LOSS[key][i]}}) for i, sd in enumerate(SEEDS)]
            groups.append((a, b, plan(tmp_path / f"plan-{match}-{size}.json", size, match)))
    return {"groups": groups, "out": tmp_path / "report", "root": tmp_path}


def argv(exp: dict[str, Any]) -> list[str]:
    out = ["--out", str(exp["out"])]
    for a, b, p in exp["groups"]:
        out += ["--lm-a", *map(str, a), "--lm-b", *map(str, b), "--plan", str(p)]
    return out


def summary(exp: dict[str, Any]) -> dict[str, Any]:
    assert main(argv(exp)) == 0
    return json.loads((exp["out"] / "summary.json").read_text())["lm"]


def test_analogue_pairs_mirror_the_cluster_pair_and_a_bad_one_is_flagged() -> None:
    ref = pair_ratios(load_model_config("rdt-770m"), load_model_config("dense-1.3b"), 2048)
    assert ref["params"] == pytest.approx(776.65 / 1333.86, abs=1e-3)
    assert ref["train_flops"] == pytest.approx(6.811 / 5.285, abs=2e-3)
    assert ref["forward_depth"] == pytest.approx(2.5, abs=1e-3) and ref["loops"] == pytest.approx(8.0, abs=1e-2)
    for size in ("s", "m"):
        an = pair_ratios(load_model_config(f"rdt-analogue-{size}"), load_model_config(f"dense-analogue-{size}"), 128)
        assert ratio_flags(an, ref) == [], (size, an)
    # the issue-14 analogue's schedule (Poisson(4), backprop through 2) and an 8192 vocabulary
    halved = load_model_config("rdt-analogue-s", ["loops.mean=4", "loops.bwd_depth=2"])
    flags = ratio_flags(pair_ratios(halved, load_model_config("dense-analogue-s"), 128), ref)
    assert {"train_flops", "forward_depth", "loops", "bwd_loops"} <= set(flags)
    big_vocab = [load_model_config(n, ["vocab_size=8192"]) for n in ("rdt-analogue-s", "dense-analogue-s")]
    assert {"head_share_a", "head_share_b"} <= set(ratio_flags(pair_ratios(*big_vocab, 128), ref))


def test_welch_interval_by_hand() -> None:
    a, b = [4.0, 4.2], [3.9, 3.95]
    va, vb = statistics.variance(a) / 2, statistics.variance(b) / 2
    df = (va + vb) ** 2 / (va**2 + vb**2)  # n - 1 = 1 per arm
    half = t95(df) * math.sqrt(va + vb)
    gap = statistics.fmean(a) - statistics.fmean(b)
    assert welch_interval(a, b) == pytest.approx((gap - half, gap + half))
    assert t95(1.0) == pytest.approx(12.706) and t95(1.9) == pytest.approx(12.706) and t95(100) == 1.96
    assert welch_interval([1.0], [2.0, 3.0]) is None
    assert welch_interval([1.0, 1.0], [0.5, 0.5]) == (0.5, 0.5)


def test_two_sizes_both_matchings(exp: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    lm = summary(exp)
    comps = lm["comparisons"]
    assert [(c["a"]["name"], c["match"]) for c in comps] == [
        ("rdt-analogue-s-cpu", "compute"), ("rdt-analogue-s-cpu", "tokens"),
        ("rdt-analogue-m-cpu", "compute"), ("rdt-analogue-m-cpu", "tokens")]
    for c, (size, match) in zip(comps, [("s", "compute"), ("s", "tokens"), ("m", "compute"), ("m", "tokens")]):
        la, lb = LOSS[f"rdt-analogue-{size}"], LOSS[f"dense-analogue-{size}-{match}"]
        assert c["gap"] == pytest.approx(statistics.fmean(la) - statistics.fmean(lb))
        assert c["interval"] == pytest.approx(welch_interval(la, lb))
        assert c["noise"] == pytest.approx(max(max(la) - min(la), max(lb) - min(lb)))
        assert c["a"]["tokens_per_param"] == pytest.approx(TOKENS["rdt"] / 280_000)
        ratio = (TOKENS["rdt"] * FLOPS_PER_TOKEN[size]["rdt"]) / (TOKENS[match] * FLOPS_PER_TOKEN[size]["dense"])
        assert c["flops_ratio_a_over_b"] == pytest.approx(ratio)
    # s/compute: gap +0.11 > noise 0.04, but the interval [-0.17, +0.39] holds 0 -> unresolved
    assert comps[0]["gap_exceeds_noise"] is True and comps[0]["verdict"] == "unresolved"
    assert comps[2]["verdict"] == "inside noise"  # m/compute: gap -0.015 < noise 0.02
    # loop use: gain 0.1 at both sizes, no harm beyond E[T]
    lu = lm["loop_use"]["rdt-analogue-s-cpu"]
    assert lu["T"] == {"1": 1, "E": 8, "2E": 16, "4E": 32}
    assert lu["gain"] == pytest.approx(0.1) and lu["loop_used"] is True and lu["more_loops_hurt"] is False
    # trend: ordered by the RDT's compute, both matchings per size
    assert [r["rdt"] for r in lm["trend"]] == ["rdt-analogue-s-cpu", "rdt-analogue-m-cpu"]
    assert lm["trend"][1]["compute"]["gap"] == pytest.approx(comps[2]["gap"])
    assert lm["trend"][0]["tokens"]["gap"] == pytest.approx(comps[1]["gap"])
    # ratio table: the two analogue pairs, none flagged
    names = [a["name"] for a in lm["ratios"]["analogues"]]
    assert names == ["rdt-analogue-s / dense-analogue-s @ seq 128", "rdt-analogue-m / dense-analogue-m @ seq 128"]
    assert all(a["flags"] == [] for a in lm["ratios"]["analogues"])
    report = (exp["out"] / "report.md").read_text()
    assert report.index("matched compute (the headline)") < report.index("matched tokens")
    assert "the gap is inside the noise" in report and "No row is flagged." in report
    assert "**not resolved**: with 2 seeds per arm the 95% interval still holds 0" in report
    assert "0.0 / 0.0 **(below 10)**" in report  # 1000 tokens for 280k params
    assert "## Trend over sizes" in report and "the loop is used" in report
    for png in ("scaling", "loss_vs_loops", "loss_vs_flops_rdt-analogue-s-cpu", "loss_vs_flops_rdt-analogue-m-cpu"):
        assert (exp["out"] / f"{png}.png").read_bytes()[:4] == b"\x89PNG", png
        assert f"({png}.png)" in report
    printed = capsys.readouterr().out
    assert "rdt-analogue-s-cpu vs dense-analogue-s-cpu (matched compute)" in printed
    assert "every row within 10%" in printed


def _set_rdt_eval(exp: dict[str, Any], size_index: int, **kw: float) -> None:
    for i, run in enumerate(exp["groups"][size_index][0]):
        loss = LOSS["rdt-analogue-s"][i] if size_index == 0 else LOSS["rdt-analogue-m"][i]
        _write(run / "eval" / "results.json", {"lm": {"loss": loss, "by_loops": rdt_by_loops(loss, **kw)}})


def test_unused_loop_and_harmful_loops_are_said_plainly(exp: dict[str, Any]) -> None:
    # T=1 as good as E[T]; 2E[T] within the seed spread (0.04), 4E[T] worse by 0.1
    _set_rdt_eval(exp, 0, gain=0.002, extra2=0.01, extra4=0.1)
    lu = summary(exp)["loop_use"]["rdt-analogue-s-cpu"]
    assert lu["threshold"] == pytest.approx(0.04)
    assert lu["loop_used"] is False and lu["more_loops_hurt"] is True
    assert lu["extra_2x"] == pytest.approx(0.01) and lu["extra_4x"] == pytest.approx(0.10)
    report = (exp["out"] / "report.md").read_text()
    assert "**the loop is unused**" in report and "**more loops hurt**" in report


def test_a_clear_gap_is_called(exp: dict[str, Any]) -> None:
    for i, run in enumerate(exp["groups"][0][1]):  # s/compute dense arm: far better, tight seeds
        _write(run / "eval" / "results.json", {"lm": {"loss": 3.0 + i * 0.001}})
    c = summary(exp)["comparisons"][0]
    assert c["verdict"] == "b ahead" and c["interval"][0] > 0


def test_refusals(exp: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    p = exp["groups"][1][2]  # the s/tokens plan says the dense arm trained other tokens
    obj = json.loads(p.read_text())
    obj["arms"][1]["tokens"] = 999.0
    p.write_text(json.dumps(obj))
    assert main(argv(exp)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "trained on 1,000 tokens but its plan's arm b" in err, err
    assert main([*argv(exp)[:-2]]) == 2  # one --plan short
    assert "3 --plan for 4 LM comparisons" in capsys.readouterr().err
    a = exp["groups"][0][0]
    assert main(["--out", str(exp["out"]), "--lm-a", *map(str, a), "--lm-b", *map(str, a)]) == 2
    assert "is given twice" in capsys.readouterr().err  # a run against itself
    _set_rdt_eval(exp, 1)
    obj["arms"][1]["tokens"] = 1000.0
    p.write_text(json.dumps(obj))
    for run in exp["groups"][2][0]:  # size m RDT evaluated without 4E[T]
        res = json.loads((run / "eval" / "results.json").read_text())
        del res["lm"]["by_loops"]["32"]
        _write(run / "eval" / "results.json", res)
    assert main(argv(exp)) == 2
    assert "no val loss at T=32" in capsys.readouterr().err
