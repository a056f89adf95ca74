#!/usr/bin/env bash
# The README's demo: a slice of `make experiment` (launch/experiment.sh) -- the same phases, data,
# models, plans and report, with one seed per arm and only the small LM size, so it finishes in
# under 15 minutes on 2 CPU cores: real corpus -> tokenizer + shards; rdt-analogue-s against
# dense-analogue-s at matched compute and at matched tokens (10 tokens per RDT parameter); the
# chain task without an oracle (the RDT at one T for all queries and with an adaptive exit, dense
# baselines); each trained with 2 CPU ranks through the real `deepspeed` launcher on identical
# data; evaluation; runs/demo/report/report.md with plots. Its runs are the experiment's seed-1
# runs of the same size, so the experiment reproduces the demo's numbers.
# Re-running continues where it stopped (see launch/experiment.sh).
#   DEMO_SEEDS="1 2" make demo     # more seeds
set -euo pipefail
cd "$(dirname "$0")/.."
EXP_OUT=${DEMO_OUT:-runs/demo} EXP_SEEDS=${DEMO_SEEDS:-1} EXP_LM_SIZES=${DEMO_LM_SIZES:-s} \
  EXP_MH_SEEDS=${DEMO_MH_SEEDS:-1} exec bash launch/experiment.sh
