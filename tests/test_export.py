"""Export: HF Llama round trip (logits match transformers), refusals, consolidated save/load, and
the DeepSpeed-checkpoint CLI on a real single-process ZeRO engine."""

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

from mythos.config import REPO_ROOT
from mythos.export import load_consolidated, main, save_consolidated, to_hf_llama
from mythos.model import build_model, load_model_config

_SMALL = ["vocab_size=512", "d_model=64", "n_heads=4", "mlp_hidden=160", "n_layers=2", "max_seq_len=64"]


def _random_model(preset: str, overrides: list[str], seed: int = 0):
    """A model whose every parameter is random and non-trivial: zero-init output projections and
    unit norm gains would hide mapping mistakes (a swapped or transposed tensor of zeros/ones)."""
    cfg = load_model_config(preset, [*overrides, "zero_init_out=false"])
    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif p.dim() >= 2:
                p.normal_(0.0, 0.05)
            else:
                p.normal_(0.0, 0.3)
    return model.eval()


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
    with pytest.raises(ValueError, match="does not match"):
        save_consolidated(model, other, tmp_path)


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
def test_cli_consolidates_deepspeed_checkpoint(tmp_path: Path, stage: int) -> None:
    """One real optimizer step of a single-process DeepSpeed engine (CPU, gloo), saved, then
    consolidated by the CLI: ZeRO-2 through zero_to_fp32, stage 0 from the module states."""
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
    cli = [sys.executable, "-m", "mythos.export", "--checkpoint", str(ckpt)]

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
        proc = subprocess.run([*cli, "--out", str(tmp_path / "hf"), "--hf-llama"], env=env,
                              capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert (tmp_path / "hf" / "config.json").is_file()
