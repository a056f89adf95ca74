#!/usr/bin/env bash
# `make experiment` (issue 20): the CPU analogue of the 770M-RDT vs 1.3B-dense claim, asked the way
# the claim is asked. Everything trains with 2 DeepSpeed ranks through the real launcher on
# identical data in identical order (seeds change the initialisation only).
#   (a) language modelling, at two sizes (S and M: M has ~2.8x the compute of S): rdt-analogue-{s,m}
#       vs dense-analogue-{s,m}, pairs that mirror rdt-770m / dense-1.3b's ratios (parameters 0.6,
#       training FLOPs per token 1.29, forward depth 2.5, Poisson(8) loops with backprop through 4;
#       the report prints both ratio tables) on the demo corpus re-tokenized at vocab 1024. The
#       RDT trains on 10 tokens per parameter; mythos-plan gives the dense arm the same training
#       compute (the headline) and, in a second run, the same tokens. Two seeds per arm; val loss
#       of the RDT at T = 1, E[T] = 8, 2E[T] and 4E[T] (the loop-use check).
#   (b) depth extrapolation on the chain task (pi^k(e) over 64 entities, trained on 1..5 hops,
#       tested on 1..12 with 48 queries per unseen hop count) without an oracle: a pure-loop RDT
#       trains with T ~ U{6..12}, drawn independently of the hops, and is tested at one T for all
#       queries (swept) and with a per-query adaptive exit (KL convergence); T = hops + 1 is kept
#       only as a labelled oracle row. Dense baselines: 1 layer (iso-parameters), 6 and 11 layers
#       (iso-depth on 5 and 10 hops). Three seeds per arm.
# Then mythos-experiment-report writes $OUT/report/report.md (plots with seed bands).
# Resumable: data prep skips finished work, training resumes from the newest checkpoint (a
# finished run is left as it is), an eval whose results file exists is skipped.
#   make experiment                                   # the whole experiment (< 90 min on 2 cores)
#   EXP_PARTS=lm bash launch/experiment.sh            # only the LM part (EXP_PARTS=chain: the other)
#   EXP_SEEDS="1" EXP_LM_SIZES=s EXP_MH_SEEDS=1 bash launch/experiment.sh   # a slice (make demo)
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
PARTS=${EXP_PARTS:-"lm chain"}
SEEDS=${EXP_SEEDS:-"1 2"}              # LM seeds
SIZES=${EXP_LM_SIZES:-"s m"}           # LM sizes (configs/run/{rdt,dense}-analogue-<size>-cpu.yaml)
OUT=${EXP_OUT:-runs/experiment}
LM_DATA=data/demo-v1024
LM_LOOPS=1,2,4,8,16,32                  # E[T] = 8: T=1, E[T], 2E[T], 4E[T] are the loop-use check
MH_SEEDS=${EXP_MH_SEEDS:-"1 2 3"}       # chain-task seeds
MH_STEPS=${EXP_MH_STEPS:-1500}          # per chain run (batch 128)
TASK=data/multihop/chain
MH_LOOPS=1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,20,24,28,32
MH_DENSE="dense-chain-l1 dense-chain dense-chain-l11"   # 1 layer (iso-params), 6 / 11 layers (iso-depth on 5 / 10 hops)
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore::FutureWarning
START=$(date +%s)
has() { [[ " $PARTS " == *" $1 "* ]]; }

free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
phase() { printf '\n=== %s (t+%ss) ===\n' "$1" "$(( $(date +%s) - START ))"; }
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
seeded() { local prefix=$1 s out=(); shift; for s in "$@"; do out+=("$OUT/${prefix}-s${s}"); done; echo "${out[@]}"; }
runs() { seeded "$1" $SEEDS; }         # one run dir per LM seed
mh_runs() { seeded "$1" $MH_SEEDS; }   # one run dir per chain seed

if has lm; then
  phase "LM data: the demo corpus at vocab 1024, seq 128 (~1 min; no network needed)"
  "$PY" -m data_prep.demo_corpus --out "$LM_DATA" --vocab-size 1024 --seq-len 128

  phase "LM plans, sizes {$SIZES}: matched compute and matched tokens (mythos-plan)"
  for size in $SIZES; do
    for match in compute tokens; do
      "$PY" -m mythos.tools.plan --a "configs/run/rdt-analogue-${size}-cpu.yaml" \
        --b "configs/run/dense-analogue-${size}-cpu.yaml" --match "$match" --out "$OUT/plan-${match}-${size}"
    done
  done

  for size in $SIZES; do
    phase "LM arms, size ${size}, seeds {$SEEDS}: the RDT, the dense arm at its compute and at its tokens"
    for seed in $SEEDS; do
      echo "--- rdt-analogue-${size} seed ${seed}"
      train "$OUT/plan-compute-${size}/rdt-analogue-${size}-cpu.yaml" "$OUT/rdt-analogue-${size}-s${seed}" "train.seed=${seed}"
      for match in compute tokens; do
        echo "--- dense-analogue-${size} (matched ${match}) seed ${seed}"
        train "$OUT/plan-${match}-${size}/dense-analogue-${size}-cpu.yaml" \
          "$OUT/dense-analogue-${size}-${match}-s${seed}" "train.seed=${seed}"
      done
    done
  done

  phase "LM eval: val loss / bpb on the whole val split (the RDT at T=${LM_LOOPS})"
  for size in $SIZES; do
    for seed in $SEEDS; do
      evaluate "$OUT/rdt-analogue-${size}-s${seed}" --loops "$LM_LOOPS" --batch-size 32
      for match in compute tokens; do evaluate "$OUT/dense-analogue-${size}-${match}-s${seed}" --batch-size 32; done
    done
  done
fi

if has chain; then
  phase "chain task: data (no network needed)"
  "$PY" -m mythos.tasks --config configs/tasks/multihop-chain.yaml --out "$TASK"

  phase "depth extrapolation: rdt-chain (T ~ U{6..12}, never told the depth) and ${MH_DENSE} x seeds {$MH_SEEDS}, ${MH_STEPS} steps each"
  for seed in $MH_SEEDS; do
    for arm in rdt-chain $MH_DENSE; do
      echo "--- ${arm} seed ${seed}"
      train "configs/run/${arm}.yaml" "$OUT/${arm}-s${seed}" "train.seed=${seed}" "train.max_steps=${MH_STEPS}"
    done
  done

  phase "multi-hop eval: exact match on 1..12 hops; the RDT at one T for all queries, adaptive exit (KL < 1e-3, at most 32), oracle T = hops + 1"
  for seed in $MH_SEEDS; do
    evaluate "$OUT/rdt-chain-s${seed}" --multihop "$TASK" --loops "$MH_LOOPS" --hops-offsets 1 --exit-kl 1e-3 \
      --exit-max-loops 32 --no-lm
    for arm in $MH_DENSE; do evaluate "$OUT/${arm}-s${seed}" --multihop "$TASK" --no-lm; done
  done
fi

if has lm; then
  phase "report"
  args=()
  for size in $SIZES; do
    for match in compute tokens; do
      # shellcheck disable=SC2207
      args+=(--lm-a $(runs "rdt-analogue-${size}") --lm-b $(runs "dense-analogue-${size}-${match}")
             --plan "$OUT/plan-${match}-${size}/plan.json")
    done
  done
  if has chain; then
    # shellcheck disable=SC2207
    args+=(--mh-a $(mh_runs rdt-chain) --mh-b $(mh_runs dense-chain-l1) --mh-extra $(mh_runs dense-chain)
           --mh-extra $(mh_runs dense-chain-l11))
  fi
  "$PY" -m mythos.tools.experiment_report --out "$OUT/report" "${args[@]}"
  echo "report: $OUT/report/report.md (plots beside it)"
fi
echo
echo "experiment finished in $(( $(date +%s) - START ))s"
