#!/usr/bin/env bash
# The README's demo: a shorter slice of `make experiment` (launch/experiment.sh) -- the same
# phases, data, models and report, with one seed per arm and fewer language-model tokens, so it
# finishes in under 15 minutes on 2 CPU cores: real corpus -> tokenizer + shards; the chain task;
# rdt-chain vs dense-chain (depth extrapolation) and rdt-analogue vs dense-analogue (the 0.6x
# parameter pair), each trained with 2 CPU ranks through the real `deepspeed` launcher on
# identical data; evaluation; runs/demo/report/report.md with plots.
# Re-running continues where it stopped (see launch/experiment.sh).
#   DEMO_LM_TOKENS=524288 make demo     # more LM tokens per arm (default 262144 = 64 steps)
set -euo pipefail
cd "$(dirname "$0")/.."
EXP_OUT=${DEMO_OUT:-runs/demo} EXP_SEEDS=${DEMO_SEEDS:-1} EXP_LM_TOKENS=${DEMO_LM_TOKENS:-262144} \
  EXP_MH_STEPS=${DEMO_MH_STEPS:-2000} exec bash launch/experiment.sh
