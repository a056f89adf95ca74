#!/usr/bin/env bash
# `make experiment` (issue 14): a CPU-sized analogue of the 770M-RDT vs 1.3B-dense claim, with two
# seeds per arm, in under an hour on 2 cores. Everything trains with 2 DeepSpeed ranks through
# the real launcher on identical data in identical order (seeds change the initialisation only).
#   (a) depth extrapolation: the chain task (configs/tasks/multihop-chain.yaml: pi^k(e), trained on
#       1..5 hops, tested on 1..12); a pure-loop RDT run at T = hops + 1 (rdt-chain) and a 6-layer
#       dense model (dense-chain); the RDT evaluated at T = 1..32 and per query at hops + 1.
#   (b) language modelling: rdt-analogue (5.41M) vs dense-analogue (9.01M), ratio 0.600 like
#       776.7M / 1333.9M = 0.582, planned with mythos.plan (matched tokens) like the cluster pair,
#       on the demo corpus; val loss / bpb of the RDT at 1..32 loops.
# Then mythos.experiment_report writes $OUT/report/report.md (plots with seed bands).
# Resumable: data prep skips finished work, training resumes from the newest checkpoint (a
# finished run is left as it is), an eval whose results file exists is skipped.
#   make experiment                                  # the whole experiment
#   EXP_SEEDS="1" EXP_LM_TOKENS=300000 bash launch/experiment.sh    # a slice (make demo)
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
SEEDS=${EXP_SEEDS:-"1 2"}
LM_TOKENS=${EXP_LM_TOKENS:-1572864}   # per LM run (384 steps of 16 x 256 tokens)
MH_STEPS=${EXP_MH_STEPS:-2000}        # per multi-hop run (batch 128)
OUT=${EXP_OUT:-runs/experiment}
TASK=data/multihop/chain
MH_LOOPS=1,2,4,6,8,12,16,32
LM_LOOPS=1,2,4,8,16,32
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore::FutureWarning
START=$(date +%s)
N_PHASES=7

free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
phase() { printf '\n=== [%s/%s] %s (t+%ss) ===\n' "$1" "$N_PHASES" "$2" "$(( $(date +%s) - START ))"; }
train() {  # train CONFIG RUN_DIR [overrides...]; a finished run is left as it is
  local cfg=$1 run=$2; shift 2
  "$PY" -m deepspeed.launcher.runner --num_gpus 2 --master_port "$(free_port)" --log_level warning \
    launch/pretrain.py --config "$cfg" "run_dir=$run" "$@"
}
evaluate() {  # evaluate RUN_DIR [mythos.eval args...]; skipped when RUN/eval/results.json exists
  local run=$1; shift
  if [[ -f "$run/eval/results.json" ]]; then echo "eval of $run: done already"; return; fi
  # one process: both cores (the 2-rank trainings use one thread per rank)
  OMP_NUM_THREADS=2 "$PY" -m mythos.eval --run "$run" --quiet "$@"
}
runs() { local prefix=$1 s out=(); for s in $SEEDS; do out+=("$OUT/${prefix}-s${s}"); done; echo "${out[@]}"; }

phase 1 "data: demo corpus (tokenizer + shards) and the chain task (~1 min; no network needed)"
"$PY" -m data_prep.demo_corpus --out data/demo
"$PY" -m mythos.tasks --config configs/tasks/multihop-chain.yaml --out "$TASK"

phase 2 "plan the LM pair (matched tokens: ${LM_TOKENS} per run) with mythos.plan"
"$PY" -m mythos.plan --a configs/run/rdt-analogue-cpu.yaml --b configs/run/dense-analogue-cpu.yaml \
  --match tokens --tokens "$LM_TOKENS" --out "$OUT/plan"

phase 3 "depth extrapolation: rdt-chain and dense-chain x seeds {$SEEDS}, ${MH_STEPS} steps each (~2 min per run)"
for seed in $SEEDS; do
  for arm in rdt dense; do
    echo "--- ${arm}-chain seed ${seed}"
    train "configs/run/${arm}-chain.yaml" "$OUT/${arm}-chain-s${seed}" "train.seed=${seed}" "train.max_steps=${MH_STEPS}"
  done
done

phase 4 "multi-hop eval: exact match on 1..12 hops; RDT at T=${MH_LOOPS} and T=hops+1 (~10 s per run)"
for seed in $SEEDS; do
  evaluate "$OUT/rdt-chain-s${seed}" --multihop "$TASK" --loops "$MH_LOOPS" --no-lm
  evaluate "$OUT/dense-chain-s${seed}" --multihop "$TASK" --no-lm
done

phase 5 "LM arms: rdt-analogue and dense-analogue x seeds {$SEEDS}, ${LM_TOKENS} tokens each (~6 min per run)"
for seed in $SEEDS; do
  for arm in rdt dense; do
    echo "--- ${arm}-analogue seed ${seed}"
    train "$OUT/plan/${arm}-analogue-cpu.yaml" "$OUT/${arm}-analogue-s${seed}" "train.seed=${seed}"
  done
done

phase 6 "LM eval: val loss / bpb (RDT at T=${LM_LOOPS}) (~1 min per run)"
for seed in $SEEDS; do
  evaluate "$OUT/rdt-analogue-s${seed}" --loops "$LM_LOOPS" --batch-size 32
  evaluate "$OUT/dense-analogue-s${seed}" --batch-size 32
done

phase 7 "report"
# shellcheck disable=SC2046
"$PY" -m mythos.experiment_report --out "$OUT/report" --plan "$OUT/plan/plan.json" \
  --lm-a $(runs rdt-analogue) --lm-b $(runs dense-analogue) \
  --mh-a $(runs rdt-chain) --mh-b $(runs dense-chain)
echo "report: $OUT/report/report.md (plots beside it)"
echo
echo "experiment finished in $(( $(date +%s) - START ))s"
