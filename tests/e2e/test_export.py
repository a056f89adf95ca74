"""Export: HF Llama round trip (logits match transformers), refusals, consolidated save/load, the
DeepSpeed-checkpoint CLI on a real single-process ZeRO engine, the Hub-complete HF directory
(tokenizer == sentencepiece, lm-eval's own ``hf`` model scores like our adapter), and the refusal
to unpickle anything but plain data from checkpoint files."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_utils import LM_EVAL_MC_TASK, random_model

from mythos.config import REPO_ROOT, dump_yaml
from mythos.data.tokenizer import Tokenizer
from mythos.ds_checkpoint import consolidate_deepspeed
from mythos.model import build_model, load_model_config
from mythos.tools.export import main, to_hf_llama
from mythos.tools.hf.export import to_hf
from mythos.weights import load_consolidated, save_consolidated

#: the session-scoped data_corpus (Shakespeare + its BPE tokenizer) and short_runs (real runs)

_SMALL = ["vocab_size=512", "d_model=64", "n_heads=4", "mlp_hidden=160", "n_layers=2", "max_seq_len=64"]


def _random_model(preset: str, overrides: list[str], seed: int = 0):
    return random_model(preset, overrides, seed, std=0.05)


# ----------------------------------------------------------------------------- HF Llama


@pytest.mark.parametrize(
    "overrides",
    [
        [],                                                        # MHA, tied embeddings
        ["n_kv_heads=2", "tie_embeddings=false", "rope_theta=500000", "norm_eps=1e-6"],  # GQA, untied
    ],
    ids=["mha-tied", "gqa-untied"],
)
def test_hf_llama_round_trip(tmp_path: Path, overrides: list[str]) -> None:
    transformers = pytest.importorskip("transformers")
    model = _random_model("dense-tiny", _SMALL + overrides)
    cfg = model.cfg
    out = to_hf_llama(model, tmp_path / "hf")

    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]  # no temp files left
    tensors = load_file(str(out / "model.safetensors"))
    assert ("lm_head.weight" in tensors) == (not cfg.tie_embeddings)
    assert "model.layers.1.self_attn.k_proj.weight" in tensors
    assert tensors["model.layers.0.self_attn.k_proj.weight"].shape == (cfg.kv_heads * cfg.head_dim, cfg.d_model)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]

    hf = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    rope = getattr(hf.config, "rope_parameters", None) or {"rope_theta": hf.config.rope_theta}
    assert rope["rope_theta"] == cfg.rope_theta  # the installed transformers reads our theta
    assert hf.config.num_key_value_heads == cfg.kv_heads
    assert hf.config.tie_word_embeddings == cfg.tie_embeddings
    assert hf.dtype == torch.float32

    ids = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids).logits, hf(ids).logits
    assert ours.abs().max() > 0.1  # a meaningful comparison, not two near-zero tensors
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)


def test_hf_llama_bf16_weights(tmp_path: Path) -> None:
    model = _random_model("dense-tiny", _SMALL)
    to_hf_llama(model, tmp_path, dtype=torch.bfloat16)
    assert load_file(str(tmp_path / "model.safetensors"))["model.norm.weight"].dtype == torch.bfloat16
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["dtype"] == cfg["torch_dtype"] == "bfloat16"


@pytest.mark.parametrize(
    ("preset", "overrides", "named"),
    [
        ("rdt-tiny", [], "kind=rdt"),
        ("dense-tiny", ["qk_norm=true", "value_embeds=alternating"], "qk_norm=true, value_embeds=alternating"),
        ("dense-tiny", ["mlp=relu2"], "mlp=relu2"),
    ],
)
def test_hf_llama_refuses_other_styles(tmp_path: Path, preset: str, overrides: list[str], named: str) -> None:
    cfg = load_model_config(preset, [o for o in _SMALL if not o.startswith("n_layers")] + overrides)
    model = build_model(cfg)
    with pytest.raises(ValueError, match="cannot export") as info:
        to_hf_llama(model, tmp_path / "hf")
    msg = str(info.value)
    assert named in msg and "\n" not in msg
    assert not (tmp_path / "hf").exists()  # refused before writing anything


# ----------------------------------------------------------------------------- consolidated


def test_consolidated_round_trip_rdt(tmp_path: Path) -> None:
    model = _random_model("rdt-tiny", [o for o in _SMALL if not o.startswith("n_layers")]
                          + ["value_embeds=alternating", "qk_norm=true", "loops.eval_loops=3"])
    # as a DeepSpeed/DDP state dict would look: wrapper prefixes are stripped on save
    wrapped = {f"module.{k}": v for k, v in model.state_dict().items()}
    save_consolidated(wrapped, model.cfg, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "model.safetensors"]
    loaded = load_consolidated(tmp_path).eval()
    assert loaded.cfg == model.cfg
    ids = torch.randint(0, model.cfg.vocab_size, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_save_consolidated_rejects_mismatched_config(tmp_path: Path) -> None:
    model = _random_model("dense-tiny", _SMALL)
    other = load_model_config("dense-tiny", [*_SMALL[:-2], "n_layers=3"])
    with pytest.raises(ValueError, match="does not match the dense config: missing"):
        save_consolidated(model, other, tmp_path / "consolidated")
    with pytest.raises(ValueError, match="does not match the dense config: missing"):  # the same check for --hf
        to_hf(model, tmp_path / "hf", cfg=other)
    assert not (tmp_path / "consolidated").exists() and not (tmp_path / "hf").exists()


# ----------------------------------------------------------------------------- DeepSpeed CLI


def test_cli_missing_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--checkpoint", str(tmp_path / "checkpoints" / "nope"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: checkpoint not found") and "\n" not in err


_DS_SAVE = textwrap.dedent("""
    import os, sys
    import torch, deepspeed
    import deepspeed.comm.torch as ds_torch
    from mythos import build_model, load_model_config
    from mythos.config import dump_yaml

    ds_torch.build_shm_op = lambda: None  # skip JIT-compiling DeepSpeed's CPU shm op (~30 s)
    run_dir, stage, overrides = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    deepspeed.init_distributed(dist_backend="gloo")
    cfg = load_model_config("dense-tiny", overrides)
    torch.manual_seed(0)
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config={
        "train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True, "steps_per_print": 10**9})
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    engine.backward(engine(ids, labels=ids).loss)
    engine.step()
    engine.save_checkpoint(os.path.join(run_dir, "checkpoints"), tag="step1")
    model_yaml = "".join("  " + line + "\\n" for line in dump_yaml(cfg).splitlines())
    with open(os.path.join(run_dir, "config.resolved.yaml"), "w") as f:
        f.write("seed: 0\\nmodel:\\n" + model_yaml)
    torch.save(engine.module.state_dict(), os.path.join(run_dir, "reference.pt"))
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 0])
def test_cli_consolidates_deepspeed_checkpoint(tmp_path: Path, stage: int, data_corpus) -> None:
    """One real optimizer step of a single-process DeepSpeed engine (CPU, gloo), saved, then
    consolidated by the CLI: ZeRO-2 through zero_to_fp32, stage 0 from the module states -- both
    with every file loaded weights_only (the real engine files pass the allow-list)."""
    pytest.importorskip("deepspeed")
    script = tmp_path / "ds_save.py"
    script.write_text(_DS_SAVE)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    proc = subprocess.run([sys.executable, str(script), str(run_dir), str(stage), *_SMALL],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = run_dir / "checkpoints" / "step1"
    cli = [sys.executable, "-m", "mythos.tools.export", "--checkpoint", str(ckpt)]

    proc = subprocess.run([*cli, "--out", str(tmp_path / "out")], env=env, capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference = torch.load(run_dir / "reference.pt")
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert merged.keys() == reference.keys()
    for k, v in reference.items():
        torch.testing.assert_close(merged[k], v.float(), atol=0, rtol=0, msg=k)
    assert load_consolidated(tmp_path / "out").cfg == load_model_config("dense-tiny", _SMALL)

    if stage == 2:  # the same checkpoint as a HF Llama directory
        # this run config has no data section: no tokenizer to find, so one line saying what to do
        proc = subprocess.run([*cli, "--out", str(tmp_path / "hf"), "--hf-llama"], env=env,
                              capture_output=True, text=True, timeout=120, cwd=tmp_path)
        err = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 2 and err.startswith("error: no data.shards") and "--tokenizer" in err, proc.stderr
        assert not (tmp_path / "hf").exists()  # refused before the merge and before writing
        # a tokenizer bigger than the model's vocabulary is refused too
        proc = subprocess.run([*cli, "--out", str(tmp_path / "hf"), "--hf-llama", "--tokenizer",
                               str(data_corpus.tokenizer_model)], env=env, capture_output=True, text=True,
                              timeout=120, cwd=tmp_path)
        assert proc.returncode == 2 and "vocab_size" in proc.stderr.strip().splitlines()[-1], proc.stderr


# ----------------------------------------------------------------------------- Hub-complete HF directory

#: Text sentencepiece handles in ways a naive HF conversion gets wrong: leading/double spaces
#: (dummy prefix is always added, spaces never folded), tabs, "\n" (a user-defined symbol) at the
#: start, CR, non-ASCII, characters outside the vocabulary (byte fallback), special-token text.
AWKWARD = ["", " ", "  ", "hello", " hello", "  hello  world ", "a\tb", "\t\tindented", "a\nb", "\n", "\n\nThe end.\n",
           " \n ", "x  \n  y", "a\r\nb", "café naïve", "日本語の文章", "🎉 party 🎉", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "Ωmega", "\u00a0nbsp",
           "1234567 89", "<s> </s> <pad> <unk>", "<0x41>", "end with space ", "ROMEO: What say you?\n"]
HF_FILES = ["config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
            "tokenizer.json", "tokenizer.model", "tokenizer_config.json"]


def test_hf_tokenizer_encodes_like_sentencepiece(tmp_path: Path, data_corpus) -> None:
    """``AutoTokenizer`` on the exported directory gives sentencepiece's ids and decodes them back
    to the same text, on awkward strings and on whole plays; it adds no BOS/EOS, and its BOS is EOS
    (what the model saw before every document)."""
    transformers = pytest.importorskip("transformers")
    tok = Tokenizer(data_corpus.tokenizer_dir)
    model = _random_model("dense-tiny", [*_SMALL, "vocab_size=1024"])
    out = to_hf_llama(model, tmp_path / "hf", tokenizer=tok)
    assert sorted(p.name for p in out.iterdir()) == HF_FILES  # no temp files left
    hf = transformers.AutoTokenizer.from_pretrained(out)

    texts = AWKWARD + [p.read_text() for p in data_corpus.text_files[:2]]
    texts += [t for p in data_corpus.text_files[2:4] for t in p.read_text().split("\n\n")]
    for text in texts:
        ids = tok.encode(text)
        assert hf.encode(text) == ids, text[:80]
        assert hf.encode(text, add_special_tokens=True) == ids  # nothing added
        assert hf.decode(ids) == tok.decode(ids) == text, text[:80]  # exact round trip
    assert any(t.startswith(" ") for t in AWKWARD) and tok.encode("日本語の文章").count(tok.sp.piece_to_id("<0xE6>"))

    eos, pad = tok.eos_id, tok.pad_id
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (eos, eos, pad)
    assert hf.decode([eos, *tok.encode("hi"), pad], skip_special_tokens=True) == "hi"
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen == {"bos_token_id": eos, "eos_token_id": eos, "pad_token_id": pad, "max_length": 64}
    cfg = transformers.AutoConfig.from_pretrained(out)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (eos, eos, pad)
    assert transformers.GenerationConfig.from_pretrained(out).max_length == 64


def test_hf_tokenizer_refuses_what_it_cannot_reproduce(tmp_path: Path, data_corpus) -> None:
    """A unigram model or a multi-character user-defined symbol cannot be written exactly: one
    line, before any file is written."""
    from data_prep.train_tokenizer import TokenizerParams, train_tokenizer

    model = _random_model("dense-tiny", [*_SMALL, "vocab_size=1024"])
    text = data_corpus.text_files[:1]
    for name, params, named in [("uni", TokenizerParams(vocab_size=400, model_type="unigram"), "model_type=unigram"),
                                ("sep", TokenizerParams(vocab_size=400, special=("<sep>",)), "'<sep>'")]:
        train_tokenizer(text, tmp_path / name, params)
        with pytest.raises(ValueError, match="cannot write a HF tokenizer") as info:
            to_hf_llama(model, tmp_path / f"hf-{name}", tokenizer=tmp_path / name)
        assert named in str(info.value) and "\n" not in str(info.value)
        assert not (tmp_path / f"hf-{name}").exists()


_MC_TASK = "task: export_mc\n" + LM_EVAL_MC_TASK
#: (context, continuation): empty context (scored after the prefix token), left truncation past
#: max_length=64, leading/double spaces, tab, newline, byte fallback
_REQUESTS = [("To be, or not to be", ", that is the question"), ("", "Hello there"), ("My lord, I", " will"),
             ("ROMEO: " * 30, " What say you?"), ("  two  spaces", "\n\tand a tab"), ("日本", " 🎉"), ("x", " y")]
_TEXTS = ["Some text here.", "Now is the winter of our discontent made glorious summer by this sun of York; " * 3]


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "layout"), [("dense", "--hf-llama"), ("rdt", "--hf")])
def test_hf_export_scores_like_our_adapter(short_runs, tmp_path: Path, monkeypatch, kind: str, layout: str) -> None:
    """The CLI turns a real run's checkpoint into a HF directory (tokenizer found through the run's
    shard manifest): the dense run as ``LlamaForCausalLM`` (``--hf-llama``), the RDT run as our
    remote code (``--hf``, ``trust_remote_code=True``, the run's default loop count). lm-eval's own
    ``hf`` model (+ ``AutoTokenizer``) runs a local task on it and its per-request
    log-likelihoods equal our adapter's on the run."""
    lm_eval = pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate", reason="lm-eval's hf model needs accelerate (dev extra)")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from mythos.eval.lm_eval_adapter import MythosLM

    for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(k, "1")  # nothing may be downloaded
    run = short_runs[kind]
    ckpt = sorted((run / "checkpoints").glob("step*"))[-1]
    out = tmp_path / "hf"
    assert main(["--checkpoint", str(ckpt), "--out", str(out), layout]) == 0
    remote = layout == "--hf"
    code = ["configuration_mythos.py", "modeling_mythos.py"] if remote else []
    assert sorted(p.name for p in out.iterdir()) == sorted(HF_FILES + code)
    assert json.loads((out / "config.json").read_text())["model_type"] == ("mythos" if remote else "llama")

    hf = HFLM(pretrained=str(out), device="cpu", dtype="float32", batch_size=3, trust_remote_code=remote)
    ours = MythosLM(run=str(run), checkpoint=ckpt.name, device="cpu", dtype="float32", batch_size=3, quiet=True)
    assert hf.prefix_token_id == ours.prefix_token_id and hf.max_length == ours.max_length

    def score(lm):
        ll = lm.loglikelihood([Instance("loglikelihood", {}, r, i) for i, r in enumerate(_REQUESTS)])
        rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), i)
                                            for i, t in enumerate(_TEXTS)])
        return ll, rolling

    (ll_hf, roll_hf), (ll_ours, roll_ours) = score(hf), score(ours)
    assert [g for _, g in ll_hf] == [g for _, g in ll_ours]
    assert [s for s, _ in ll_hf] == pytest.approx([s for s, _ in ll_ours], abs=1e-4)
    assert roll_hf == pytest.approx(roll_ours, abs=1e-3)  # sums of ~10^2-10^3 nats
    assert len({round(s, 2) for s, _ in ll_hf}) == len(ll_hf)  # distinct: a permutation would show

    rows = [{"context": "To be, or not to be, that is the", "choices": [" question", " banana"], "label": 0},
            {"context": "My lord, I", "choices": [" will", " xylophone"], "label": 0}]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "export_mc.yaml").write_text(_MC_TASK.format(data=tmp_path))
    model_args = f"pretrained={out},device=cpu,dtype=float32,batch_size=2" + (",trust_remote_code=True" * remote)
    res = lm_eval.simple_evaluate(model="hf", model_args=model_args,
                                  tasks=["export_mc"], task_manager=TaskManager(include_path=str(tmp_path)),
                                  log_samples=True)
    samples = sorted(res["samples"]["export_mc"], key=lambda s: s["doc_id"])
    args = [tuple(a) for s in samples for a in s["arguments"]]  # (context, " " + choice) as lm-eval built them
    assert [a[0] for a in args[:2]] == [rows[0]["context"]] * 2 and len(args) == 4
    got = [resp[0][0] for s in samples for resp in s["resps"]]
    want = ours.loglikelihood([Instance("loglikelihood", {}, a, i) for i, a in enumerate(args)])
    assert got == pytest.approx([s for s, _ in want], abs=1e-4)
    picked = [int(want[2 * i + 1][0] > want[2 * i][0]) for i in range(len(rows))]  # two choices per row
    acc = sum(p == r["label"] for p, r in zip(picked, rows)) / len(rows)
    assert res["results"]["export_mc"]["acc,none"] == pytest.approx(acc)  # the task's metric, our scores


# ----------------------------------------------------------------------------- untrusted pickles


class _Payload:
    """Unpickling this calls ``os.mkdir(marker)``: the stand-in for arbitrary code in a pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


_MODEL_STATES, _OPTIM_STATES = "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"


def _evil_checkpoint(tmp_path: Path, file: str, other: str | None = None) -> tuple[Path, Path]:
    """A run dir whose checkpoint ``file`` holds real-looking weights plus the payload, beside a
    harmless ``other`` file (an optimizer shard sends export down the zero_to_fp32 path)."""
    cfg = load_model_config("dense-tiny", _SMALL)
    run, marker = tmp_path / "run", tmp_path / "payload-ran"
    ckpt = run / "checkpoints" / "step1"
    ckpt.mkdir(parents=True)
    (run / "config.yaml").write_text("model:\n" + "".join(f"  {ln}\n" for ln in dump_yaml(cfg).splitlines()))
    states = {"module": build_model(cfg, device="meta").state_dict(), "extra": _Payload(marker)}
    states["module"] = {k: torch.zeros(v.shape) for k, v in states["module"].items()}
    if other:
        torch.save({"module": states["module"]}, ckpt / other)
    torch.save(states, ckpt / file)
    return ckpt, marker


@pytest.mark.parametrize(("file", "other"), [(_MODEL_STATES, None), (_OPTIM_STATES, _MODEL_STATES)])
def test_export_refuses_pickled_callables(tmp_path: Path, file: str, other: str | None,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """A checkpoint file naming a callable outside the allow-list is refused with one line, and
    the payload never runs (stage-0 path and ZeRO/zero_to_fp32 path)."""
    ckpt, marker = _evil_checkpoint(tmp_path, file, other)
    out = tmp_path / "out"
    assert main(["--checkpoint", str(ckpt), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"error: refusing to unpickle posix.mkdir from {ckpt / file}: load only checkpoints you trust "
                   "(--trust-checkpoint loads it anyway)")
    assert not marker.exists() and not out.exists()


def test_weights_only_guard_holds_without_the_prescan(tmp_path: Path, monkeypatch) -> None:
    """The pre-scan is not the only guard: with it disabled, the loads themselves (ours and the
    ones inside DeepSpeed's zero_to_fp32) run weights_only and still refuse; ``trust=True`` really
    unpickles (so the payload above is live, and the refusals are what keeps it from running)."""
    import mythos.ds_checkpoint as export

    monkeypatch.setattr(export, "check_pickles", lambda files: None)
    for name, other in [("stage0", None), ("zero", _OPTIM_STATES)]:  # zero_to_fp32 reads model states first
        ckpt, marker = _evil_checkpoint(tmp_path / name, _MODEL_STATES, other)
        with pytest.raises(export.UntrustedCheckpointError, match="refusing to unpickle") as info:
            consolidate_deepspeed(ckpt)
        assert "\n" not in str(info.value) and not marker.exists()
    ckpt, marker = _evil_checkpoint(tmp_path / "trusted", _MODEL_STATES)
    consolidate_deepspeed(ckpt, trust=True)
    assert marker.is_dir()
