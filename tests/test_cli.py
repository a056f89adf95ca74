"""One CLI style across every entry point (docs/cli.md): ``--help`` exits 0 and shows each
option's default and a help string; bad input is exactly one ``error:`` line on stderr, exit 2.

Every tool runs as a subprocess (``sys.executable -m ...`` or the script), with inputs that fail
before any data, model or training work, so the whole file takes seconds per tool."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # train_utils, also under pytest -p no:conftest
from train_utils import unwritable  # noqa: E402

from mythos.cli_common import (
    ArgumentParser,
    out_file,
    parse_float_list,
    parse_int_list,
    parse_loops,
    resolve_checkpoint,
)
from mythos.config import ConfigError

REPO = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())  # tests/ or tests/*/
MISSING = "/nonexistent/mythos-cli-test"

#: (id, command after the interpreter, module:function building its parser, bad-input arguments)
TOOLS: list[tuple[str, list[str], str, list[str]]] = [
    ("prep", ["-m", "data_prep.shard"], "data_prep.shard:build_parser",
     ["--tokenizer", MISSING, "--input", MISSING, "--out", "{tmp}/shards", "--seq-len", "8"]),
    ("tokenizer", ["-m", "data_prep.train_tokenizer"], "data_prep.train_tokenizer:build_parser",
     ["--input", MISSING, "--vocab-size", "100", "--out", "{tmp}/tok"]),
    ("merge", ["-m", "data_prep.merge"], "data_prep.merge:build_parser", ["--out", MISSING]),
    ("demo-corpus", ["-m", "data_prep.demo_corpus"], "data_prep.demo_corpus:build_parser", ["--seq-len", "x"]),
    ("eval", ["-m", "mythos.eval"], "mythos.eval.cli:build_parser", ["--run", MISSING]),
    ("lm-eval-adapter", ["-m", "mythos.eval.lm_eval_adapter"], "mythos.eval.lm_eval_adapter:build_parser",
     ["--run", MISSING, "--tasks", "hellaswag", "--loops", "1,x"]),
    ("export", ["-m", "mythos.tools.export"], "mythos.tools.export:build_parser",
     ["--run", MISSING, "--out", "{tmp}/out"]),
    ("plan", ["-m", "mythos.tools.plan"], "mythos.tools.plan:build_parser",
     ["--a", f"{MISSING}.yaml", "--b", f"{MISSING}.yaml", "--match", "tokens"]),
    ("plan-launch", ["launch/plan.py"], "mythos.tools.plan:build_parser",
     ["--a", f"{MISSING}.yaml", "--b", f"{MISSING}.yaml", "--match", "compute"]),
    ("compare", ["-m", "mythos.tools.compare"], "mythos.tools.compare:build_parser",
     ["--a", MISSING, "--b", MISSING, "--out", "{tmp}/report"]),
    ("compare-launch", ["launch/compare.py"], "mythos.tools.compare:build_parser",
     [MISSING, MISSING, "--out", "{tmp}/r"]),
    ("experiment-report", ["-m", "mythos.tools.experiment_report"], "mythos.tools.experiment_report:build_parser",
     ["--out", "{tmp}/r", "--lm-a", MISSING, "--lm-b", MISSING]),
    ("accounting", ["-m", "mythos.tools.flops_table"], "mythos.tools.flops_table:build_parser", [f"{MISSING}.yaml"]),
    ("tasks", ["-m", "mythos.tasks"], "mythos.tasks.build:build_parser",
     ["--config", f"{MISSING}.yaml", "--out", "{tmp}/task"]),
    ("submit", ["launch/slurm/submit.py"], "launch/slurm/submit.py:build_parser",
     ["--config", f"{MISSING}.yaml", "--nodes", "1", "--dry-run"]),
    ("train", ["-m", "mythos.train"], "mythos.train.cli:build_parser", ["--config", f"{MISSING}.yaml"]),
    ("train-launch", ["launch/pretrain.py"], "mythos.train.cli:build_parser", ["--config", f"{MISSING}.yaml"]),
]
IDS = [t[0] for t in TOOLS]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *cmd], cwd=REPO, capture_output=True, text=True, timeout=300)


def _load_script(path: str) -> ModuleType:
    """A script (not a module) imported by path, e.g. ``launch/slurm/submit.py``."""
    name = f"_cli_{Path(path).stem}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # its dataclasses look their module up here
        spec.loader.exec_module(module)
    return sys.modules[name]


def _parser_factory(spec: str) -> Callable[[], argparse.ArgumentParser]:
    where, name = spec.split(":")
    module = _load_script(where) if where.endswith(".py") else importlib.import_module(where)
    return getattr(module, name)


def _defaulted(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """Options with a default worth showing (not a flag, not None, not hidden)."""
    return [a for a in parser._actions if a.help != argparse.SUPPRESS and a.nargs != 0 and a.default is not None
            and a.default is not argparse.SUPPRESS]


@pytest.mark.parametrize(("name", "cmd", "factory", "bad"), TOOLS, ids=IDS)
def test_help_exits_0_and_shows_defaults(name: str, cmd: list[str], factory: str, bad: list[str]) -> None:
    proc = _run([*cmd, "--help"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage:") and not proc.stderr, proc.stderr[-2000:]
    if _defaulted(_parser_factory(factory)()):
        assert "default" in proc.stdout


@pytest.mark.parametrize(("name", "cmd", "factory", "bad"), TOOLS, ids=IDS)
def test_every_option_has_help_and_shows_its_default(name: str, cmd: list[str], factory: str, bad: list[str]) -> None:
    """The shared parser (one-line errors, defaults formatter); every option has help text; every
    option with a default says it in its help line."""
    parser = _parser_factory(factory)()
    assert isinstance(parser, ArgumentParser), f"{name}: use mythos.cli_common.ArgumentParser"
    formatter = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue  # --help itself; hidden aliases of older spellings
        assert action.help, f"{name}: {action.option_strings or action.dest} has no help text"
        if action.option_strings and action.default is None and action.nargs != 0 and not action.required:
            # unset means something (a path from the manifest, no such section): say what (issue 24)
            said = any(w in action.help.lower() for w in ("default", "required", "omit"))
            assert said, f"{name}: {action.option_strings}: say what leaving it unset does: {action.help!r}"
        if action in _defaulted(parser):
            text = formatter._expand_help(action)
            assert "default" in text.lower() or "0 = " in text, f"{name}: {action.option_strings}: {text!r}"


@pytest.mark.parametrize(("name", "cmd", "factory", "bad"), TOOLS, ids=IDS)
def test_bad_input_is_one_error_line_exit_2(name: str, cmd: list[str], factory: str, bad: list[str],
                                            tmp_path: Path) -> None:
    proc = _run([*cmd, *[a.replace("{tmp}", str(tmp_path)) for a in bad]])
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr[-2000:]


@pytest.mark.parametrize(("name", "cmd", "factory", "bad"), TOOLS, ids=IDS)
def test_usage_error_is_one_line(name: str, cmd: list[str], factory: str, bad: list[str],
                                 capsys: pytest.CaptureFixture[str]) -> None:
    """argparse's own errors (an unknown option) are one ``error: ... (see PROG --help)`` line too."""
    with pytest.raises(SystemExit) as exc:
        _parser_factory(factory)().parse_args(["--no-such-option"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "--help" in err, err


# ---------------------------------------------------------------------------- issue 24's failure paths


def _fake_run(path: Path, steps: int) -> Path:
    """The least a run directory needs for mythos-compare: run_info.json + metrics.jsonl."""
    path.mkdir(parents=True)
    rows = [{"step": s, "time": 100.0 + s, "train/loss": 5.0, "train/tokens": 512 * s, "train/flops": 1e6 * s}
            for s in range(1, steps + 1)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "run_info.json").write_text(json.dumps({"name": path.name, "kind": "dense", "data_fingerprint": "f" * 64,
                                                    "data_hash": "d" * 64, "total_steps": steps}))
    return path


NEW_USER_PATHS = ["compare-itself", "compare-budget", "compare-out-file", "plan-out-file", "plan-out-read-only",
                  "report-out-file", "accounting-batch-0", "accounting-seq-neg", "accounting-empty-loop",
                  "train-override-typo", "dry-run-run-dir-file", "train-run-dir-file", "export-out-file"]


@pytest.mark.parametrize("case", NEW_USER_PATHS)
def test_new_user_failure_paths_are_one_line(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every failure path of issue 24 that needs no trained run, through the command's own
    ``main()`` (the launch in its own process): one ``error:`` line naming the culprit, exit 2, no
    traceback. (Those that need a trained run:
    test_eval.py::test_eval_refuses_a_foreign_checkpoint_and_an_unwritable_results_dir,
    test_wandb.py (the dry run on a changed resume), test_resume_safety.py (disk full).)"""
    a, b = _fake_run(tmp_path / "a", 20), _fake_run(tmp_path / "b", 20)
    taken = tmp_path / "taken"
    taken.write_text("a file")
    rdt, dense = "configs/run/rdt-tiny-cpu.yaml", "configs/run/dense-tiny-cpu.yaml"
    ro = contextlib.nullcontext()
    if case == "compare-itself":
        cmd, want = ["-m", "mythos.tools.compare", "--a", str(a), "--b", str(tmp_path / "b" / ".." / "a"), "--out",
                     str(tmp_path / "r")], "compared with itself"
    elif case == "compare-budget":
        cmd, want = ["-m", "mythos.tools.compare", "--a", str(a), "--b", str(_fake_run(tmp_path / "c", 30)), "--out",
                     str(tmp_path / "r")], "unmatched budgets: 10,240 vs 15,360 tokens"
    elif case == "compare-out-file":
        cmd, want = ["-m", "mythos.tools.compare", "--a", str(a), "--b", str(b), "--out", str(taken)], "is a file"
    elif case == "plan-out-file":
        cmd, want = ["-m", "mythos.tools.plan", "--a", rdt, "--b", dense, "--match", "tokens", "--tokens", "1e5",
                     "--out", str(taken / "plans")], f"lies under the file {taken}"
    elif case == "plan-out-read-only":
        ro = unwritable(tmp_path / "ro")
        cmd, want = ["-m", "mythos.tools.plan", "--a", rdt, "--b", dense, "--match", "tokens", "--tokens", "1e5",
                     "--out", str(tmp_path / "ro" / "plans")], "is not writable"
    elif case == "report-out-file":
        cmd, want = ["-m", "mythos.tools.experiment_report", "--out", str(taken), "--lm-a", str(a), "--lm-b", str(b)], \
            "is a file"
    elif case == "accounting-batch-0":
        cmd, want = ["-m", "mythos.tools.flops_table", rdt, "--global-batch", "0"], "--global-batch"
    elif case == "accounting-seq-neg":
        cmd, want = ["-m", "mythos.tools.flops_table", rdt, "--seq-len", "-5"], "--seq-len"
    elif case == "accounting-empty-loop":
        cmd, want = ["-m", "mythos.tools.flops_table", rdt, "--loops", "1,,2"], "--loops"
    elif case == "train-override-typo":
        cmd, want = ["-m", "mythos.train.cli", "--config", rdt, "--dry-run", "train.max_stpes=3"], \
            "in the command-line override 'train.max_stpes=3'"
    elif case == "dry-run-run-dir-file":
        cmd, want = ["-m", "mythos.train.cli", "--config", rdt, "--dry-run", "--gpus", "2", f"run_dir={taken}"], \
            f"error: run dir: run_dir {taken} is a file"
    elif case == "train-run-dir-file":
        cmd, want = ["-m", "mythos.train", "--config", rdt, f"run_dir={taken}"], "is a file"
    else:
        cmd, want = ["-m", "mythos.tools.export", "--run", str(a), "--out", str(taken)], "is a file"
    with ro:
        if case == "train-run-dir-file":  # the launch itself: a process that must exit 2 before any group
            proc = _run(cmd)
            code, err = proc.returncode, proc.stderr
        else:  # the same main() the installed command runs, in this process (seconds saved per case)
            capsys.readouterr()
            try:
                code = importlib.import_module(cmd[1]).main(cmd[2:])
            except SystemExit as exc:  # argparse-level refusals exit from inside main()
                code = exc.code
            err = capsys.readouterr().err
    assert code == 2, (code, err[-2000:])
    assert "Traceback" not in err and err.count("\n") == 1, err[-2000:]
    assert err.startswith("error: ") and want in err, err


# ---------------------------------------------------------------------------- shared helpers


def test_parse_loops() -> None:
    assert parse_loops("4,1,2,2") == [1, 2, 4]
    assert parse_loops(16) == [16]
    for bad in ("", "0,2", "a", "1,-1"):
        with pytest.raises(ConfigError, match="--loops"):
            parse_loops(bad)
    assert parse_int_list("2,0", "--hops-offsets", 0) == [0, 2]
    for bad in ("x", "-1", "1,,2", "4,"):  # an empty item is a typo, not skipped
        with pytest.raises(ConfigError, match="--hops-offsets must be"):
            parse_int_list(bad, "--hops-offsets", 0)
    assert parse_float_list("1e-2,1e-3,1e-2", "--exit-kl") == [1e-3, 1e-2]
    for bad in ("x", "0", "-1e-3", "1e-3,"):
        with pytest.raises(ConfigError, match="--exit-kl must be"):
            parse_float_list(bad, "--exit-kl")


def test_out_file() -> None:
    assert out_file(None, Path("run/eval"), "results.json") == Path("run/eval/results.json")
    assert out_file("elsewhere", Path("run/eval"), "results.json") == Path("elsewhere/results.json")
    assert out_file("old/res.json", Path("run/eval"), "results.json") == Path("old/res.json")  # older spelling


def test_resolve_checkpoint(tmp_path: Path) -> None:
    """latest = newest complete tag; a tag name under RUN/checkpoints; a path; partial saves refused
    unless asked; every miss is one line naming what exists."""
    root = tmp_path / "checkpoints"
    for step, complete in ((100, True), (200, True), (300, False)):
        tag = root / f"step{step:07d}"
        tag.mkdir(parents=True)
        if complete:
            (tag / "COMPLETE").write_text("{}")
    assert resolve_checkpoint(tmp_path, None) == (root / "step0000200", 200)
    assert resolve_checkpoint(tmp_path, "latest") == (root / "step0000200", 200)
    assert resolve_checkpoint(tmp_path, "step0000100") == (root / "step0000100", 100)
    assert resolve_checkpoint(None, str(root / "step0000100")) == (root / "step0000100", 100)
    with pytest.raises(ConfigError, match="no COMPLETE marker"):
        resolve_checkpoint(tmp_path, "step0000300")
    assert resolve_checkpoint(tmp_path, "step0000300", require_complete=False)[1] == 300
    with pytest.raises(ConfigError, match=r"complete checkpoints: step0000100, step0000200"):
        resolve_checkpoint(tmp_path, "step9999999")
    with pytest.raises(ConfigError, match="needs --run"):
        resolve_checkpoint(None, "latest")
    with pytest.raises(ConfigError, match="^checkpoint not found"):
        resolve_checkpoint(None, str(root / "nope"))
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        resolve_checkpoint(tmp_path / "empty", "latest")
    exported = tmp_path / "exported"
    exported.mkdir()
    (exported / "model.safetensors").write_bytes(b"")
    assert resolve_checkpoint(tmp_path, str(exported)) == (exported, -1)


def test_compare_positional_alias_and_arm_flags(tmp_path: Path) -> None:
    """``mythos-compare RUN_A RUN_B`` (older) and ``--a/--b`` both parse; mixing them is refused."""
    from mythos.tools.compare import build_parser

    a = build_parser().parse_intermixed_args(["A", "--out", str(tmp_path), "B"])
    assert (a.run_a, a.run_b) == ("A", "B")
    a = build_parser().parse_args(["--a", "A", "--b", "B", "--out", str(tmp_path)])
    assert (a.a, a.b) == ("A", "B")
    proc = _run(["-m", "mythos.tools.compare", "--a", "A", "B", "--out", str(tmp_path)])
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "not mixed" in proc.stderr


def test_submit_arm_flags_and_pair_alias() -> None:
    module = _load_script("launch/slurm/submit.py")
    new = module.parse_args(["--a", "x.yaml", "--b", "y.yaml", "--nodes", "1"])
    old = module.parse_args(["--pair", "x.yaml", "y.yaml", "--nodes", "1"])
    assert new.pair == old.pair == ["x.yaml", "y.yaml"]
    assert module.parse_args(["--config", "x.yaml", "--nodes", "1"]).pair is None
