"""``mythos-export --hf``: every model kind as a Hugging Face remote-code directory.

The exported directories are loaded by ``AutoModelForCausalLM.from_pretrained(DIR,
trust_remote_code=True)`` in one child interpreter where mythos cannot be imported (``python -I``
plus a meta-path finder that refuses ``mythos``; the child asserts ``import mythos`` fails), so
the exported code is proven to need only torch + transformers -- cheaper than a fresh venv without
mythos, and the same claim for the code that runs. The child's logits and generations are
compared here with our model's: logits at T = 1, 4, 8, 32 (the dense: once), greedy ``generate``
with the KV cache token for token, and the per-step logits of cached decoding (which exercise
the ACT and KL early stops with their cache fill-in). lm-eval's ``hf`` model on an exported run is
in ``test_export.py::test_hf_export_scores_like_our_adapter``.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from train_utils import random_model

from mythos.config import dump_yaml
from mythos.model import build_model, load_model_config
from mythos.model.layers import KVCache
from mythos.tools.export import main
from mythos.tools.hf.export import CODE_DIR, HF_CODE_FILES, to_hf

pytest.importorskip("transformers")

LOOPS = (1, 4, 8, 32)
GEN_LOOPS = 6  # generate / cached decoding: one loop count that is not any config default
_TINY = ["d_model=48", "n_heads=4", "mlp_hidden=96", "vocab_size=320", "max_seq_len=64"]
#: name -> (preset, overrides): the presets the issue names, plus every RDT option the exported
#: code implements (injections, LoRA, loop embedding, ACT, the KL early exit, GQA, untied head,
#: value embeddings on every layer, a pure loop without prelude/coda)
MODELS = {
    "rdt-tiny": ("rdt-tiny", []),
    "rdt-analogue-s": ("rdt-analogue-s", []),
    "dense-analogue-s": ("dense-analogue-s", []),
    "rdt-options": ("rdt-tiny", [*_TINY, "n_kv_heads=2", "injection=concat", "lora.rank=4", "lora.max_iters=3",
                                 "loop_embed=true", "act.enabled=true", "tie_embeddings=false", "value_embeds=all",
                                 "qk_norm=true", "mlp=relu2"]),
    "rdt-kl-exit": ("rdt-tiny", [*_TINY, "injection=additive", "n_prelude=0", "n_coda=0", "early_exit_kl=1e-4",
                                 "loops.eval_loops=3"]),
    # the core's MoE FFN (routed top-2 of 4 + a shared expert) next to LoRA on the core's attention
    "rdt-moe": ("rdt-tiny", [*_TINY, "moe.enabled=true", "moe.num_experts=4", "moe.top_k=2", "moe.num_shared=1",
                             "lora.rank=2", "lora.max_iters=4"]),
}

EXIT_CAP = 8  # the adaptive exit's cap (num_loops) in the no-cache parity test (the child's own copy)
#: per model, the exit options whose no-cache forwards are compared; each makes the 2 rows exit at
#: different iterations (asserted), so the per-row exit is what is compared
EXITS = {
    "rdt-tiny": [{"exit_kl": 0.1}],
    "rdt-kl-exit": [{"exit_kl": 1e-4}],
    "rdt-options": [{"exit_kl": 1e-3}, {"exit_act": True}],
    "rdt-moe": [{"exit_kl": 0.01}],
}


def _random_model(preset: str, overrides: list[str], seed: int = 0):
    return random_model(preset, overrides, seed, std=0.08)


def _cached_decode(model, ids: torch.Tensor, prompt_len: int,
                   **kw) -> tuple[list[torch.Tensor], list[float], list[list[int]]]:
    """Our model decoding ``ids`` with a KV cache (prompt, then one token a step): the last
    position's logits per step, the loop iterations each step ran (``loops_run``) and each row's
    exit iteration per step (``exit_loops``; empty without an adaptive exit)."""
    cache, logits, loops, exits = KVCache(), [], [], []
    with torch.no_grad():
        for end in range(prompt_len, ids.shape[1] + 1):
            out = model(ids[:, (0 if end == prompt_len else end - 1):end], cache=cache, **kw)
            logits.append(out.logits[:, -1])
            loops.append(float(out.aux.get("loops_run", 0)))
            exits.append(out.aux["exit_loops"].tolist() if "exit_loops" in out.aux else [])
    return logits, loops, exits


_CHILD = textwrap.dedent('''
    import importlib.abc, json, sys

    class _NoMythos(importlib.abc.MetaPathFinder):
        """mythos must not be needed: refuse it whatever the install (editable, site-packages)."""
        def find_spec(self, name, path=None, target=None):
            if name == "mythos" or name.startswith("mythos."):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked: the export must not need mythos)")
            return None

    sys.meta_path.insert(0, _NoMythos())
    try:
        import mythos  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("mythos is importable in the child")

    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    EXIT_CAP = 8
    torch.set_num_threads(int(sys.argv[3]))  # the parent's: the same reduction order, the same bits
    job = torch.load(sys.argv[1])
    results = {}
    for name, spec in job.items():
        model, info = AutoModelForCausalLM.from_pretrained(spec["dir"], trust_remote_code=True,
                                                           output_loading_info=True)
        model.eval()
        res = {"module": type(model).__module__, "dtype": str(model.dtype),
               "info": {k: sorted(map(str, v)) for k, v in info.items()}, "logits": {}}
        with torch.no_grad():
            for t in spec["loops"]:
                kw = {} if t is None else {"num_loops": t}
                res["logits"][t] = model(spec["ids"], **kw).logits
            kw = {} if spec["gen_loops"] is None else {"num_loops": spec["gen_loops"]}
            res["generate"] = model.generate(spec["prompt"], max_new_tokens=spec["new"], do_sample=False, **kw)
            cache, steps = DynamicCache(), []
            seq, p = spec["decode"], spec["prompt"].shape[1]
            for end in range(p, seq.shape[1] + 1):
                out = model(seq[:, (0 if end == p else end - 1):end], cache=cache, use_cache=True, **kw)
                steps.append(out.logits[:, -1])
            res["decode"] = steps
            res["default_loops"] = model(spec["ids"]).logits
            res["exits"] = []
            for kw in spec["exits"]:  # the per-row adaptive exit without a cache
                logits = model(spec["ids"], num_loops=EXIT_CAP, **kw).logits
                res["exits"].append((logits, model.model.exit_loops.tolist()))
        results[name] = res
    torch.save(results, sys.argv[2])
''')


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Each model of :data:`MODELS` exported with ``to_hf`` and run by our code and, in one child
    without mythos, by the exported code: ``{name: {"ours": ..., "theirs": ..., "dir": ...}}``."""
    root = tmp_path_factory.mktemp("hf_export")
    job, ours = {}, {}
    for name, (preset, overrides) in MODELS.items():
        model = _random_model(preset, overrides)
        out = to_hf(model, root / name)
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, model.cfg.vocab_size, (2, 12), generator=g)
        prompt = ids[:, :5]
        rdt = model.cfg.kind == "rdt"
        loops = list(LOOPS) if rdt else [None]
        gen_kw = {"num_loops": GEN_LOOPS} if rdt else {}
        with torch.no_grad():
            logits = {t: model(ids, **({} if t is None else {"num_loops": t})).logits for t in loops}
            default = model(ids).logits
        generated = model.generate(prompt, 10, **gen_kw)
        decode_logits, decode_loops, decode_exits = _cached_decode(model, generated, prompt.shape[1], **gen_kw)
        exits = []
        for kw in EXITS.get(name, []):
            with torch.no_grad():
                res = model(ids, num_loops=EXIT_CAP, **kw)
            exits.append((res.logits, res.aux["exit_loops"].tolist()))
        ours[name] = {"model": model, "logits": logits, "generate": generated, "decode": decode_logits,
                      "decode_loops": decode_loops, "decode_exits": decode_exits, "default_loops": default,
                      "exits": exits}
        job[name] = {"dir": str(out), "ids": ids, "prompt": prompt, "new": 10, "loops": loops,
                     "gen_loops": GEN_LOOPS if rdt else None, "decode": generated, "exits": EXITS.get(name, [])}
    torch.save(job, root / "job.pt")
    (root / "child.py").write_text(_CHILD)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "HF_", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(root / "hf_home"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-I", str(root / "child.py"), str(root / "job.pt"), str(root / "res.pt"),
                           str(torch.get_num_threads())],
                          env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    theirs = torch.load(root / "res.pt")
    return {name: {"ours": ours[name], "theirs": theirs[name], "dir": root / name} for name in MODELS}


@pytest.mark.parametrize("name", list(MODELS))
def test_hf_export_loads_without_mythos(exported: dict, name: str) -> None:
    """The directory has exactly the layout files, all with the same mode (model.safetensors is
    not left 0600 by safetensors' own temp file), and loads through ``auto_map`` from
    transformers' module cache with no missing or unexpected weight."""
    out, theirs = exported[name]["dir"], exported[name]["theirs"]
    assert sorted(p.name for p in out.iterdir()) == sorted(["config.json", "model.safetensors", *HF_CODE_FILES])
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    umask = os.umask(0)
    os.umask(umask)
    assert set(modes.values()) == {0o666 & ~umask}, modes
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mythos"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_mythos.MythosForCausalLM"
    assert theirs["module"].startswith("transformers_modules.")  # the copied file, not mythos.tools.hf
    assert theirs["info"] == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
    assert theirs["dtype"] == "torch.float32"


@pytest.mark.parametrize("name", list(MODELS))
def test_hf_export_logits_match_ours(exported: dict, name: str) -> None:
    """Logits equal ours to fp32 round-off at every loop count (and at the config's default), and
    the loop count matters (so an off-by-one iteration would show)."""
    ours, theirs = exported[name]["ours"], exported[name]["theirs"]
    for t, want in ours["logits"].items():
        assert want.abs().max() > 0.1
        torch.testing.assert_close(theirs["logits"][t], want, atol=1e-5, rtol=1e-5,
                                   msg=lambda m, t=t: f"{name} T={t}: {m}")
    torch.testing.assert_close(theirs["default_loops"], ours["default_loops"], atol=1e-5, rtol=1e-5)
    if ours["model"].cfg.kind == "rdt":
        assert (ours["logits"][1] - ours["logits"][4]).abs().max() > 1e-3


@pytest.mark.parametrize("name", list(MODELS))
def test_hf_export_generates_like_ours(exported: dict, name: str) -> None:
    """Greedy ``generate`` with the KV cache gives our tokens, and cached decoding step by step
    gives our logits; the ACT and KL models really stop looping early, at different iterations on
    different steps (so their early exit, and the cache fill-in of the skipped iterations that
    later steps attend to, are what is compared)."""
    ours, theirs = exported[name]["ours"], exported[name]["theirs"]
    assert torch.equal(theirs["generate"], ours["generate"])
    for step, (got, want) in enumerate(zip(theirs["decode"], ours["decode"], strict=True)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5,
                                   msg=lambda m, step=step: f"{name} step {step}: {m}")
    if name in ("rdt-options", "rdt-kl-exit"):  # exits at different depths: later steps read filled slots
        assert min(ours["decode_loops"]) < GEN_LOOPS and len(set(ours["decode_loops"])) > 1, ours["decode_loops"]
        # and per row: in some step the two rows of the batch exit at different iterations
        assert any(len(set(step)) > 1 for step in ours["decode_exits"]), ours["decode_exits"]


@pytest.mark.parametrize("name", list(EXITS))
def test_hf_export_exits_per_row_like_ours(exported: dict, name: str) -> None:
    """The exported per-row adaptive exit (``exit_kl`` / ``exit_act`` on ``forward``, no cache):
    every row exits at our iteration and gets our logits, with the two rows of the batch exiting
    at different iterations (so a batch-wide stop, or one iteration late, would show)."""
    ours, theirs = exported[name]["ours"], exported[name]["theirs"]
    assert len(theirs["exits"]) == len(ours["exits"]) == len(EXITS[name])
    for kw, (want, want_t), (got, got_t) in zip(EXITS[name], ours["exits"], theirs["exits"], strict=True):
        assert got_t == want_t and len(set(want_t)) > 1 and max(want_t) < EXIT_CAP, (kw, want_t, got_t)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=lambda m, kw=kw: f"{name} {kw}: {m}")


def test_hf_code_imports_only_torch_and_transformers() -> None:
    """The two files the export copies import nothing of mythos (only torch, transformers, the
    standard library and each other), so a directory never needs mythos to load."""
    allowed = {"__future__", "collections", "typing", "torch", "transformers"}
    for name in HF_CODE_FILES:
        tree = ast.parse((CODE_DIR / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: only the sibling config file
                    assert node.module == "configuration_mythos", (name, node.module)
                    continue
                roots = {node.module.split(".")[0]}
            else:
                continue
            assert roots <= allowed, (name, roots)


# ----------------------------------------------------------------------------- refusals (CLI)


def _fake_run(tmp_path: Path, overrides: list[str]) -> Path:
    """The checkpoint tag of a run whose config has ``overrides``; the tag is empty: the CLI
    must refuse before it reads any weights (a merge of this tag would fail differently)."""
    cfg = load_model_config("rdt-tiny", [*_TINY, *overrides])
    run = tmp_path / "run"
    (run / "checkpoints" / "step1").mkdir(parents=True)
    (run / "checkpoints" / "step1" / "COMPLETE").touch()
    (run / "config.yaml").write_text("model:\n" + "".join(f"  {ln}\n" for ln in dump_yaml(cfg).splitlines()))
    return run / "checkpoints" / "step1"


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith("error: "), err
    return err


def test_hf_refuses_an_option_it_does_not_know_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """An option the exported code does not know (one added to ModelConfig after the exporter; here
    ``qk_norm``, struck from the known list) is named in one line, exit 2, before any work; the
    library call refuses it the same way and writes nothing."""
    import mythos.tools.hf.export as hf_export

    monkeypatch.setattr(hf_export, "KNOWN_OPTIONS", hf_export.KNOWN_OPTIONS - {"qk_norm"})
    ckpt = _fake_run(tmp_path, ["qk_norm=true"])
    out = tmp_path / "hf"
    assert main(["--checkpoint", str(ckpt), "--out", str(out), "--hf", "--tokenizer", str(tmp_path)]) == 2
    assert _one_line_error(capsys) == "error: cannot export with --hf: qk_norm=True (unknown to the --hf export)"
    model = build_model(load_model_config("rdt-tiny", [*_TINY, "qk_norm=true"]))
    with pytest.raises(ValueError, match=r"^cannot export 'rdt-tiny' with --hf: qk_norm=True \(unknown to the --hf"):
        to_hf(model, out)
    assert not out.exists()


def _immutable(path: Path) -> bool:
    """Make ``path`` unwritable even for root (``chattr +i``); False where that is impossible."""
    path.chmod(0o555)
    if os.geteuid() != 0:
        return True
    return shutil.which("chattr") is not None and subprocess.run(["chattr", "+i", str(path)]).returncode == 0


@pytest.mark.parametrize("case", ["file", "under-file", "read-only"])
def test_export_out_refused_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str) -> None:
    """``--out`` that is a file, lies under a file, or is in a read-only directory: one ``error:``
    line and exit 2 before anything is read (the checkpoint tag here is empty and the run has no
    tokenizer, so getting further would fail with another message), for every layout."""
    ckpt = _fake_run(tmp_path, [])
    target = tmp_path / "target"
    if case == "file":
        target.write_text("x")
        out, want = target, "is a file"
    elif case == "under-file":
        target.write_text("x")
        out, want = target / "hf", "lies under the file"
    else:
        target.mkdir()
        if not _immutable(target):
            pytest.skip("cannot make a directory read-only for root here (no chattr)")
        out, want = target / "hf", "is not writable"
    try:
        for layout in ([], ["--hf-llama"], ["--hf"]):
            assert main(["--checkpoint", str(ckpt), "--out", str(out), *layout]) == 2
            err = _one_line_error(capsys)
            assert want in err and str(out) in err, err
    finally:
        if case == "read-only" and os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(target)])
        if target.is_dir():
            target.chmod(0o755)


def test_hf_left_padded_batch_generates_like_each_row(exported: dict) -> None:
    """Padding (which mythos itself never sees): a left-padded batch with its ``attention_mask``
    generates, greedy with the cache, what each prompt generates alone, with the same per-step
    logits to round-off (the masked attention path against the unmasked causal one)."""
    from transformers import AutoModelForCausalLM

    out = exported["rdt-options"]["dir"]
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(1, 300, (n,), generator=g) for n in (7, 4)]
    batch = torch.zeros(2, 7, dtype=torch.long)
    mask = torch.zeros(2, 7, dtype=torch.long)
    for i, r in enumerate(rows):
        batch[i, 7 - len(r):], mask[i, 7 - len(r):] = r, 1
    kw = {"max_new_tokens": 6, "do_sample": False, "num_loops": GEN_LOOPS, "pad_token_id": 0,
          "output_logits": True, "return_dict_in_generate": True}
    together = model.generate(batch, attention_mask=mask, **kw)
    for i, r in enumerate(rows):
        alone = model.generate(r[None], **kw)
        assert torch.equal(together.sequences[i, 7:], alone.sequences[0, len(r):]), i
        for got, want in zip(together.logits, alone.logits, strict=True):
            torch.testing.assert_close(got[i], want[0], atol=1e-4, rtol=1e-4)
