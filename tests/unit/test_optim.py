"""Optimiser parameter classification: weight decay groups and the Muon / AdamW split."""

from __future__ import annotations

import mythos
from mythos.train.config import OptimConfig
from mythos.train.optim import muon_eligible, param_groups


def _rdt():
    cfg = mythos.load_model_config(
        "rdt-tiny", ["lora.rank=2", "value_embeds=alternating", "loop_embed=true", "act.enabled=true"]
    )
    return mythos.build_model(cfg, device="meta")


def test_muon_only_on_true_weight_matrices() -> None:
    flags = muon_eligible(_rdt())
    assert flags["core.0.attn.q_proj.weight"] and flags["prelude.0.mlp.down_proj.weight"]
    for name in ("injection.B.weight", "readout.weight", "embed.weight", "value_embeds.0.weight",
                 "core.0.attn.q_proj.lora_A", "core.0.attn.q_proj.lora_B", "loop_embed.weight",
                 "injection.A_log", "injection.dt_bias", "norm.weight", "core.0.attn_norm.weight", "halt.weight"):
        assert not flags[name], name


def test_weight_decay_only_on_matrices() -> None:
    model = _rdt()
    groups = {g["name"]: g for g in param_groups(model, OptimConfig(weight_decay=0.1))}
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0
    no_decay = {id(p) for p in groups["no_decay"]["params"]}
    named = dict(model.named_parameters())
    for name in ("injection.B.weight", "readout.weight", "injection.A_log", "embed.weight", "norm.weight"):
        assert id(named[name]) in no_decay, name
    assert id(named["core.0.mlp.up_proj.weight"]) not in no_decay
    assert sum(len(g["params"]) for g in groups.values()) == len(named)
