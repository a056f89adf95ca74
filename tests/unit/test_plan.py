"""launch/plan.py: matched-compute arithmetic, tokens-per-parameter (Parcae's 80x), resolved
run configs that load, and explicit statements of the matching and FLOPs conventions."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mythos.train.config import load_run_config

REPO = Path(__file__).resolve().parents[2]
A, B = "configs/run/rdt-770m.yaml", "configs/run/dense-1.3b.yaml"

_spec = importlib.util.spec_from_file_location("launch_plan", REPO / "launch" / "plan.py")
plan_mod = importlib.util.module_from_spec(_spec)
sys.modules["launch_plan"] = plan_mod  # dataclasses resolve their module by name
_spec.loader.exec_module(plan_mod)


@pytest.fixture(scope="module")
def cfgs():
    return load_run_config(REPO / A), load_run_config(REPO / B)


def test_matched_compute_equalises_total_flops(cfgs) -> None:
    p = plan_mod.plan(*cfgs, "compute", flops=3e20)
    a, b = p["arms"]
    assert abs(a["model_flops"] / b["model_flops"] - 1) < 0.01
    assert abs(a["model_flops"] / 3e20 - 1) < 0.01
    assert a["tokens"] < b["tokens"]  # the RDT spends more FLOPs per token at E[T] = 8
    for arm in (a, b):
        assert arm["tokens"] == arm["steps"] * arm["tokens_per_step"]
        assert arm["model_flops"] == pytest.approx(arm["model_flops_per_token"] * arm["tokens"])
    assert "same compute" in p["description"] and p["match"] == "compute"


def test_tokens_per_param_is_parcae_protocol(cfgs) -> None:
    p = plan_mod.plan(*cfgs, "tokens-per-param")
    a, b = p["arms"]
    assert p["params_basis"] == "nominal"  # names carry 770m / 1.3b
    assert a["tokens"] == pytest.approx(61.6e9, rel=1e-3) and b["tokens"] == pytest.approx(104e9, rel=1e-3)
    exact = plan_mod.plan(*cfgs, "tokens-per-param", ratio=80, params_basis="exact")
    for arm in exact["arms"]:
        assert arm["tokens"] == pytest.approx(80 * arm["params"], rel=1e-3)  # within one step
    assert exact["arms"][0]["params"] == pytest.approx(776.7e6, rel=1e-3)


def test_same_tokens_and_executed_flops_are_reported(cfgs) -> None:
    p = plan_mod.plan(*cfgs, "tokens", tokens=1e10)
    a, b = p["arms"]
    assert a["tokens"] == b["tokens"] and abs(a["tokens"] / 1e10 - 1) < 1e-3
    # active rows (the default): the RDT executes its sequences' own loops, ~E[T] (issue 11's bar:
    # executed/model <= 1.15 at global batch 512); the dense executes what it is charged
    assert a["loops_executed"] == pytest.approx(a["loops_expected"], abs=0.05)
    assert a["loops_expected"] == pytest.approx(8.0, abs=0.05)
    assert a["executed_flops_per_token"] <= 1.15 * a["model_flops_per_token"]
    assert b["executed_flops_per_token"] == b["model_flops_per_token"]
    assert a["gpu_hours_executed"] > a["gpu_hours"]  # per-iteration checkpointing recomputes
    # masked execution runs the global-batch max T for every sequence
    masked = dataclasses.replace(cfgs[0], model=dataclasses.replace(
        cfgs[0].model, loops=dataclasses.replace(cfgs[0].model.loops, execution="masked")))
    m = plan_mod.plan(masked, cfgs[1], "tokens", tokens=1e10)["arms"][0]
    assert m["loops_executed"] > a["loops_expected"] + 8
    assert m["executed_flops_per_token"] > 1.3 * m["model_flops_per_token"]


def test_cli_writes_loadable_configs_and_plan(tmp_path: Path) -> None:
    out = tmp_path / "plan"
    proc = subprocess.run([sys.executable, "launch/plan.py", "--a", A, "--b", B, "--match", "compute",
                           "--flops", "2e20", "--out", str(out)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "matching: compute" in proc.stdout and "hardware GFLOP/token" in proc.stdout
    plan = json.loads((out / "plan.json").read_text())
    assert plan["match"] == "compute"
    for arm in plan["arms"]:
        path = out / f"{arm['name']}.yaml"
        assert "matching = compute" in path.read_text().splitlines()[0]
        cfg = load_run_config(path)
        assert cfg.train.max_tokens == arm["tokens"] and cfg.train.max_steps == 0


def test_cli_bad_input_is_one_line(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "launch/plan.py", "--a", "configs/run/nope.yaml", "--b", B, "--match",
                           "tokens"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
    proc = subprocess.run([sys.executable, "launch/plan.py", "--a", A, "--b", B, "--match", "compute",
                           "--flops", "1e12"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "off by" in proc.stderr  # one step is already > 1% of the budget
