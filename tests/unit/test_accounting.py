"""Parameter counts of the presets, and the FLOPs formula against torch's FlopCounterMode."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mythos.accounting import (
    count_params,
    executed_loops,
    flops_per_token,
    mfu,
    peak_flops_for_device,
    resolve_loops,
)
from mythos.model import build_model, load_model_config
from mythos.tools.flops_table import main

# ----------------------------------------------------------------------------- parameters


@pytest.mark.parametrize(
    ("preset", "expected_m"),
    [("rdt-770m", 776.65), ("dense-1.3b", 1333.86), ("rdt-770m-swiglu", 767.1), ("dense-1.3b-llama", 1300.3)],
)
def test_preset_param_counts(preset: str, expected_m: float) -> None:
    pc = count_params(load_model_config(preset))
    assert pc.total / 1e6 == pytest.approx(expected_m, rel=0.01)
    assert sum(pc.parts.values()) == pc.total
    assert "other" not in pc.parts, "a model module is missing from the accounting part table"
    assert pc.embedding + pc.non_embedding == pc.total


def test_value_embedding_share_matches_design() -> None:
    # docs/design.md, "Models" (presets): 377.5M of rdt-770m and 604.0M of dense-1.3b are value-embedding tables
    assert count_params(load_model_config("rdt-770m")).parts["value_embeds"] / 1e6 == pytest.approx(377.5, abs=0.1)
    assert count_params(load_model_config("dense-1.3b")).parts["value_embeds"] / 1e6 == pytest.approx(604.0, abs=0.1)


@pytest.mark.parametrize(
    ("preset", "overrides"),
    [
        ("dense-tiny", []),
        ("dense-tiny", ["tie_embeddings=false", "value_embeds=all", "n_kv_heads=2"]),
        ("rdt-tiny", []),
        ("rdt-tiny", ["tie_embeddings=false", "value_embeds=alternating", "loop_embed=true", "act.enabled=true",
                      "moe.enabled=true", "lora.rank=4", "injection=concat"]),
    ],
)
def test_count_params_equals_real_model(preset: str, overrides: list[str]) -> None:
    cfg = load_model_config(preset, overrides)
    model = build_model(cfg)
    pc = count_params(cfg)
    assert pc.total == sum(p.numel() for p in model.parameters())
    assert "other" not in pc.parts
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model
    assert pc.parts["head"] == head
    assert pc.embedding == pc.parts["embed"] + pc.parts["value_embeds"] + head


# ----------------------------------------------------------------------------- FLOPs formula


def test_design_reference_numbers() -> None:
    """docs/design.md, "FLOPs accounting": ~5.4 GFLOP/token for rdt-770m (mu=8, k=4) vs ~4.4 for dense-1.3b, attention
    excluded."""
    rdt = flops_per_token(load_model_config("rdt-770m"), 2048)
    dense = flops_per_token(load_model_config("dense-1.3b"), 2048)
    assert rdt.loops == pytest.approx(8.0, abs=0.02)
    assert rdt.bwd_loops == pytest.approx(3.94, abs=0.02)  # E[min(T, 4)], T ~ max(Poisson(8), 1)
    assert rdt.total_no_attention / 1e9 == pytest.approx(5.4, abs=0.1)
    assert dense.total_no_attention / 1e9 == pytest.approx(4.4, abs=0.1)


def test_dense_is_6n_plus_12lsd() -> None:
    cfg = load_model_config("dense-1.3b-llama")
    f = flops_per_token(cfg, 1024)
    n_matmul = count_params(cfg).non_embedding - (2 * cfg.n_layers + 1) * cfg.d_model + cfg.vocab_size * cfg.d_model
    assert f.total == pytest.approx(6 * n_matmul + 12 * cfg.n_layers * 1024 * cfg.d_model, rel=1e-12)


def test_resolve_loops() -> None:
    cfg = load_model_config("rdt-tiny")
    assert resolve_loops(cfg, 6, 2) == (6.0, 2.0)
    assert resolve_loops(cfg, 6, 0) == (6.0, 6.0)  # full backprop
    assert resolve_loops(cfg, 1, 2) == (1.0, 1.0)
    t, k = resolve_loops(cfg)
    assert t == pytest.approx(4.0, abs=0.05) and 1.0 < k < 2.0
    masked = dataclasses.replace(cfg.loops, execution="masked")
    n, kn = executed_loops(masked, global_batch=64, steps=200)
    assert n > t + 2 and kn == pytest.approx(2.0)  # masked: every sequence runs the batch's max T
    n, kn = executed_loops(cfg.loops, global_batch=64, steps=200)  # active rows: the model's own
    assert n == pytest.approx(t, abs=0.05) and kn == pytest.approx(k, abs=0.02)


def _measured_per_token(cfg, batch: int, seq: int, **kwargs) -> tuple[float, float]:
    """(forward, forward+backward) FLOPs per token that FlopCounterMode sees for one train step.

    CPU SDPA dispatches to a fused kernel (``_scaled_dot_product_flash_attention_for_cpu``) that
    FlopCounterMode has no formula for -- it would count attention as 0 -- so we force the math
    backend, whose bmm's it counts (full S x S, like our convention)."""
    torch.manual_seed(0)
    model = build_model(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = model(ids, labels=ids, **kwargs)
        fwd = counter.get_total_flops()
        out.loss.backward()
    n_tok = batch * seq
    return fwd / n_tok, counter.get_total_flops() / n_tok


def test_flop_counter_misses_cpu_fused_sdpa() -> None:
    """Documents why the cross-check forces the math backend."""
    q = torch.randn(1, 2, 16, 8)
    with FlopCounterMode(display=False) as fused:
        F.scaled_dot_product_attention(q, q, q, is_causal=True)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as math:
        F.scaled_dot_product_attention(q, q, q, is_causal=True)
    assert math.get_total_flops() == 2 * 2 * 2 * 16 * 16 * 8  # QK^T and PV, full S x S
    assert fused.get_total_flops() in (0, math.get_total_flops())


# The formula counts exactly what FlopCounterMode counts (matmuls); the ops it leaves out (norms,
# softmax, RoPE, activations, the loss) FlopCounterMode does not count either, so the match is
# exact, not just within a few percent.
_CASES = [
    ("dense-tiny", [], None),
    ("dense-tiny", ["n_kv_heads=2", "tie_embeddings=false"], None),
    ("dense-tiny", ["checkpoint_layers=true"], None),
    ("rdt-tiny", [], 3),                        # truncated: k = min(3, 2) = 2
    ("rdt-tiny", [], 1),                        # T < bwd_depth: k = 1
    ("rdt-tiny", ["loops.bwd_depth=0"], 3),     # full backprop: k = T
    ("rdt-tiny", ["checkpoint_loops=true", "checkpoint_layers=true"], 3),
    ("rdt-tiny", ["moe.enabled=true", "lora.rank=4", "act.enabled=true", "injection=concat",
                  "loop_embed=true", "checkpoint_loops=true", "checkpoint_layers=true"], 3),
]


@pytest.mark.parametrize(("preset", "overrides", "loops"), _CASES)
def test_flops_match_flop_counter(preset: str, overrides: list[str], loops: int | None) -> None:
    # shrunk so the check stays fast on a loaded CPU: the formula is size-agnostic
    cfg = load_model_config(preset, ["vocab_size=512", "d_model=128", "mlp_hidden=256", *overrides])
    seq = 32
    kwargs = {} if loops is None else {"num_loops": loops}  # training mode: truncation applies
    fwd, total = _measured_per_token(cfg, batch=2, seq=seq, **kwargs)
    hfu = flops_per_token(cfg, seq, loops_mean=loops, include_recompute=True)
    mfu_f = flops_per_token(cfg, seq, loops_mean=loops)
    # the fused loss head (mythos.model.loss) computes its 4 V d backward FLOPs inside the forward
    head_bwd = 4.0 * cfg.vocab_size * cfg.d_model
    assert fwd == pytest.approx(hfu.forward + head_bwd, rel=1e-9)
    assert total == pytest.approx(hfu.total, rel=1e-9)
    ckpt = cfg.checkpoint_layers or (cfg.kind == "rdt" and cfg.checkpoint_loops)
    assert (hfu.recompute > 0) == ckpt
    assert mfu_f.total == pytest.approx(hfu.total - hfu.recompute, rel=1e-12)
    assert 0 < hfu.attention < hfu.total


def test_attention_term_scales_with_seq_len() -> None:
    cfg = load_model_config("rdt-tiny")
    a, b = flops_per_token(cfg, 128, loops_mean=3), flops_per_token(cfg, 256, loops_mean=3)
    assert b.total_no_attention == pytest.approx(a.total_no_attention)
    assert b.attention == pytest.approx(2 * a.attention)
    # per layer application: 4 S d forward, 8 S d backward; 1 + 3 + 1 fwd and 1 + 2 + 1 bwd layers x2
    d = cfg.d_model
    assert a.attn_forward == pytest.approx(4 * 128 * d * (1 + 3 * 2 + 1))
    assert a.attn_backward == pytest.approx(8 * 128 * d * (1 + 2 * 2 + 1))


# ----------------------------------------------------------------------------- MFU helpers


def test_peak_flops_and_mfu() -> None:
    assert peak_flops_for_device("NVIDIA H100 80GB HBM3") == 989.5e12
    assert peak_flops_for_device("NVIDIA H100 PCIe") == 756e12
    assert peak_flops_for_device("NVIDIA H200") == 989.5e12
    assert peak_flops_for_device("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops_for_device("cpu") is None
    f = flops_per_token(load_model_config("dense-tiny"), 64)
    assert mfu(1000.0, f, 1e12) == pytest.approx(1000.0 * f.total / 1e12)
    assert mfu(2.0, 3.0, 12.0) == pytest.approx(0.5)


def test_cli(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rdt-tiny", "dense-tiny", "--seq-len", "64", "loops.schedule=fixed", "loops.mean=3"]) == 0
    out = capsys.readouterr().out
    assert "rdt-tiny" in out and "dense-tiny" in out and "total (MFU)" in out and "3.00 / 2.00" in out
    assert main(["rdt-tiny", "no_such_key=1"]) == 2


def test_cli_takes_run_configs(capsys: pytest.CaptureFixture[str]) -> None:
    """A run config counts as its model section, with the same key=value overrides as a model file
    (issue 24: 'unknown config key data' where train, plan and submit take run configs)."""
    assert main(["configs/run/rdt-analogue-s-cpu.yaml", "--seq-len", "128", "loops.mean=4"]) == 0
    via_run = capsys.readouterr().out
    assert main(["rdt-analogue-s", "--seq-len", "128", "loops.mean=4"]) == 0
    assert capsys.readouterr().out == via_run and "4.02 / " in via_run  # Poisson(4), T >= 1


@pytest.mark.parametrize("argv, want", [
    (["rdt-tiny", "--global-batch", "0"], "--global-batch must be integers >= 1, got '0'"),
    (["rdt-tiny", "--global-batch", "8,,64"], "--global-batch must be comma-separated integers, got '8,,64'"),
    (["rdt-tiny", "--seq-len", "-5"], "--seq-len must be >= 0"),
])
def test_cli_bad_numbers_are_one_line(argv: list[str], want: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and want in err, err
