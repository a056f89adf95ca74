"""mythos.tools.experiment_report on synthetic run directories: the summary's numbers (recomputed here
independently), the PNGs and report, and the refusals (different data, seeds, plan) as one line."""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path
from typing import Any

import pytest

from mythos.tools.experiment_report import main

HOPS = [str(h) for h in range(1, 8)]
TRAIN_HOPS = 4  # not the default 5: the flag must be honoured
LM_LOSS = {"a": [5.10, 5.16], "b": [5.30, 5.32]}  # mythos.eval lm.loss per seed
SEEDS = (11, 12)


def _write(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def make_run(path: Path, *, name: str, kind: str, seed: int, fingerprint: str = "f" * 64,
             results: dict[str, Any] | None = None, consumed_sha: str = "c") -> Path:
    """A run directory with what load_run / data_check read: run_info.json, config.resolved.yaml,
    metrics.jsonl (train rows every 10 steps, val rows at 50 and 100), consumed.jsonl, eval/results.json."""
    _write(path / "run_info.json", {"name": name, "kind": kind, "params": 600 if kind == "rdt" else 1000,
                                    "data_hash": "d" * 64, "data_fingerprint": fingerprint, "start_time": 0.0})
    (path / "config.resolved.yaml").write_text(f"name: {name}\ntrain:\n  seed: {seed}\n")
    rows = []
    for step in range(10, 101, 10):
        rows.append({"step": step, "time": float(step), "train/loss": 8.0 - step / 50 + seed / 100,
                     "train/tokens": step * 1000.0, "train/flops": step * 1000.0 * (3e6 if kind == "rdt" else 2e6)})
        if step % 50 == 0:
            rows.append({"step": step, "time": float(step), "val/loss": 6.0 - step / 100 + seed / 100})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "consumed.jsonl").write_text("".join(json.dumps({"step": s, "samples": s * 8, "sha": f"{consumed_sha}{s}"})
                                                 + "\n" for s in range(10, 101, 10)))
    if results is not None:
        _write(path / "eval" / "results.json", results)
    return path


def _accuracy(rng: random.Random, keys: list[str]) -> dict[str, dict[str, float]]:
    return {k: {h: round(rng.random(), 4) for h in HOPS} for k in keys}


@pytest.fixture()
def runs(tmp_path: Path) -> dict[str, Any]:
    rng = random.Random(0)
    out: dict[str, Any] = {"lm-a": [], "lm-b": [], "mh-a": [], "mh-b": [], "acc": {"a": [], "b": []}}
    for i, seed in enumerate(SEEDS):
        by_loops = {str(t): {"loss": LM_LOSS["a"][i] + abs(t - 4) / 10} for t in (1, 2, 4, 8)}
        out["lm-a"].append(make_run(tmp_path / f"rdt-lm-s{seed}", name="rdt-x", kind="rdt", seed=seed,
                                    results={"lm": {"loss": LM_LOSS["a"][i], "by_loops": by_loops}}))
        out["lm-b"].append(make_run(tmp_path / f"dense-lm-s{seed}", name="dense-x", kind="dense", seed=seed,
                                    results={"lm": {"loss": LM_LOSS["b"][i]}}))
        for arm, kind, keys in (("a", "rdt", ["1", "2", "4", "8", "hops+1"]), ("b", "dense", ["default"])):
            acc = _accuracy(rng, keys)
            out["acc"][arm].append(acc)
            mh = {"task": "khop", "data_hash": "t" * 64, "train_hops": list(range(1, TRAIN_HOPS + 1)),
                  "chance": 1 / 16, "count": dict.fromkeys(HOPS, 16), "accuracy": acc}
            out[f"mh-{arm}"].append(make_run(tmp_path / f"{kind}-mh-s{seed}", name=f"{kind}-mh", kind=kind,
                                             seed=seed, fingerprint="m" * 64, consumed_sha="m",
                                             results={"multihop": mh}))
    plan = {"match": "tokens", "description": "same tokens", "arms": [
        {"name": "rdt-x", "kind": "rdt", "params": 540, "tokens": 1e5, "model_flops": 3e11, "hardware_flops": 4e11},
        {"name": "dense-x", "kind": "dense", "params": 900, "tokens": 1e5, "model_flops": 2e11,
         "hardware_flops": 2.5e11}]}
    _write(tmp_path / "plan.json", plan)
    out["plan"] = tmp_path / "plan.json"
    out["out"] = tmp_path / "report"
    return out


def _argv(r: dict[str, Any], multihop: bool = True) -> list[str]:
    argv = ["--out", str(r["out"]), "--plan", str(r["plan"]), "--train-hops", str(TRAIN_HOPS)]
    for key in ("lm-a", "lm-b", "mh-a", "mh-b") if multihop else ("lm-a", "lm-b"):
        argv += [f"--{key}", *map(str, r[key])]
    return argv


def _in_dist(acc: dict[str, float]) -> float:
    return statistics.fmean(acc[h] for h in HOPS if int(h) <= TRAIN_HOPS)


def test_summary_numbers_plots_and_report(runs: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_argv(runs)) == 0
    out = runs["out"]
    s = json.loads((out / "summary.json").read_text())
    lm, mh = s["lm"]["comparisons"][0], s["multihop"]
    assert len(s["lm"]["comparisons"]) == 1 and s["lm"]["ratios"] is None  # no model section in these runs
    # LM: mean / gap / seed noise, recomputed from the inputs
    mean_a, mean_b = statistics.fmean(LM_LOSS["a"]), statistics.fmean(LM_LOSS["b"])
    noise = max(max(v) - min(v) for v in LM_LOSS.values())
    assert lm["val_loss_source"] == "eval"
    assert lm["a"]["final_val_loss"]["per_seed"] == LM_LOSS["a"]
    assert lm["a"]["final_val_loss"]["mean"] == pytest.approx(mean_a)
    assert lm["b"]["final_val_loss"]["mean"] == pytest.approx(mean_b)
    assert lm["a"]["final_val_loss"]["half_range"] == pytest.approx(0.03)
    assert lm["gap"] == pytest.approx(mean_a - mean_b) and lm["noise"] == pytest.approx(noise)
    assert lm["gap_exceeds_noise"] is (abs(mean_a - mean_b) > noise) is True
    assert lm["a"]["params"] == 540 and lm["params_ratio_a_over_b"] == pytest.approx(540 / 900)  # from the plan
    assert lm["a"]["seeds"] == ["seed 11", "seed 12"]
    assert lm["a"]["loss_by_loops"]["8"]["mean"] == pytest.approx(mean_a + 0.4)
    # multihop: primary = best fixed T (no adaptive exit here; the hops+1 oracle never is) / dense
    # default, unseen-hop curves (the adaptive exit: tests/unit/test_experiment_report_multihop.py)
    acc_a, acc_b = runs["acc"]["a"], runs["acc"]["b"]
    assert mh["a"]["in_distribution"]["key"] == mh["a"]["best_fixed_key"]
    oracle = next(r for r in mh["a"]["rows"] if r["key"] == "hops+1")
    assert oracle["oracle"] and oracle["in_distribution"]["per_seed"] == pytest.approx(
        [_in_dist(a["hops+1"]) for a in acc_a])
    assert mh["b"]["in_distribution"]["key"] == "default"
    assert mh["b"]["in_distribution"]["mean"] == pytest.approx(statistics.fmean(_in_dist(a["default"]) for a in acc_b))
    best = max(["1", "2", "4", "8"], key=lambda k: statistics.fmean(_in_dist(a[k]) for a in acc_a))
    assert mh["a"]["best_fixed_key"] == best
    row = next(r for r in mh["a"]["rows"] if r["label"].startswith("best fixed"))
    assert row["in_distribution"]["mean"] == pytest.approx(statistics.fmean(_in_dist(a[best]) for a in acc_a))
    assert mh["unseen_hops"] == ["5", "6", "7"]
    for h in mh["unseen_hops"]:
        assert mh["a"]["unseen"][h] == pytest.approx(statistics.fmean(a[best][h] for a in acc_a))
        assert mh["b"]["unseen_per_seed"][1][h] == acc_b[1]["default"][h]
    for png in ("loss_vs_flops_rdt-x", "loss_vs_loops", "multihop_accuracy"):
        assert (out / f"{png}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    report = (out / "report.md").read_text()
    for png in ("loss_vs_flops_rdt-x", "loss_vs_loops", "multihop_accuracy"):
        assert f"({png}.png)" in report
    # |gap| 0.18 > noise 0.06, but with two seeds the Welch interval [-0.58, +0.22] holds 0
    assert "## Language modelling: matched tokens" in report and "**not resolved**" in report
    assert f"| a | rdt-mh | best fixed T = {best} (one T for every query) | seed 12 |" in report
    printed = capsys.readouterr().out.strip().splitlines()
    assert "rdt-x vs dense-x (matched tokens)" in printed[0] and "unresolved" in printed[0]


def test_lm_only_without_eval_uses_training_val(runs: dict[str, Any]) -> None:
    """No eval/results.json in one LM run: every run's final val loss is the trainer's last eval."""
    (runs["lm-b"][0] / "eval" / "results.json").unlink()
    assert main(_argv(runs, multihop=False)) == 0
    lm = json.loads((runs["out"] / "summary.json").read_text())["lm"]["comparisons"][0]
    assert lm["val_loss_source"] == "training"
    assert lm["b"]["final_val_loss"]["per_seed"] == pytest.approx([5.0 + s / 100 for s in SEEDS])
    assert not (runs["out"] / "multihop_accuracy.png").exists()


def _edit_json(path: Path, **changes: Any) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("case", ["fingerprint", "seed_data", "consumed", "seed", "count", "plan", "train_hops",
                                  "budget"])
def test_refusals_are_one_line(runs: dict[str, Any], case: str, capsys: pytest.CaptureFixture[str]) -> None:
    bad = runs["lm-b"][1]
    if case == "budget":  # no plan, and one dense seed trained 3/4 of the tokens
        rows = [json.loads(ln) for ln in (bad / "metrics.jsonl").read_text().splitlines()]
        for r in rows:
            if "train/tokens" in r:
                r["train/tokens"] *= 0.75
                r["train/flops"] *= 0.75
        (bad / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        want = [str(runs["lm-a"][1]), str(bad), "unmatched budgets: 100,000 vs 75,000 tokens", "--plan"]
    elif case == "fingerprint":  # a different fingerprint in one seed of the dense arm
        _edit_json(bad / "run_info.json", data_fingerprint="0" * 64)
        want = ["data fingerprints differ", str(runs["lm-a"][1]), str(bad)]
    elif case == "seed_data":  # both arms' second seed agree with each other, not with the first seed
        for run in (runs["lm-a"][1], bad):
            _edit_json(run / "run_info.json", data_fingerprint="0" * 64)
        want = ["data fingerprints differ", str(runs["lm-a"][0]), str(runs["lm-a"][1])]
    elif case == "consumed":  # one multihop seed consumed other samples at step 30
        bad = runs["mh-a"][1]
        text = (bad / "consumed.jsonl").read_text().replace('"m30"', '"x30"')
        (bad / "consumed.jsonl").write_text(text)
        want = ["multihop runs", "consumed different samples", str(bad)]
    elif case == "seed":
        (bad / "config.resolved.yaml").write_text("train:\n  seed: 99\n")
        want = [str(runs["lm-a"][1]), str(bad), "seed 99"]
    elif case == "count":
        runs["lm-b"] = runs["lm-b"][:1]
        want = ["2 runs in arm a but 1 in arm b"]
    elif case == "plan":
        plan = json.loads(runs["plan"].read_text())
        plan["arms"].reverse()
        runs["plan"].write_text(json.dumps(plan))
        want = ["plan arm a is dense-x", "not of these runs"]
    else:
        res = runs["mh-b"][0] / "eval" / "results.json"
        obj = json.loads(res.read_text())
        obj["multihop"]["train_hops"] = [1, 2, 3, 4, 5]
        res.write_text(json.dumps(obj))
        want = ["trained on hops [1, 2, 3, 4, 5], not 1..4"]
    argv = _argv(runs)
    if case == "budget":
        argv = [x for i, x in enumerate(argv) if x != "--plan" and argv[i - 1] != "--plan"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for w in want:
        assert w in err, (w, err)
    assert not (runs["out"] / "report.md").exists() and not (runs["out"] / "summary.json").exists()
