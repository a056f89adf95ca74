#!/usr/bin/env bash
# Depth-extrapolation experiment on CPU (a few minutes on 2 cores): build the k-hop task, train a
# tiny RDT and a tiny dense model (same 4 distinct blocks, same data/seed/batch/steps) on 1..5-hop
# queries with 2 CPU ranks, then score both on 1..12 hops -- the RDT at 1..32 test-time loops.
#   MH_STEPS=600 bash launch/multihop.sh        # more steps (default 300)
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
STEPS=${MH_STEPS:-300}
TASK=data/multihop/khop
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore::FutureWarning

free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

"$PY" -m mythos.tasks --config configs/tasks/multihop-khop.yaml --out "$TASK"
for arm in rdt dense; do
  echo "--- train ${arm}-multihop (${STEPS} steps, 2 CPU ranks)"
  "$PY" -m deepspeed.launcher.runner --num_gpus 2 --master_port "$(free_port)" --log_level warning \
    launch/pretrain.py --config "configs/run/${arm}-multihop.yaml" "train.max_steps=${STEPS}"
  echo "--- evaluate ${arm}-multihop on 1..12 hops"
  OMP_NUM_THREADS=2 "$PY" -m mythos.eval --run "runs/demo/${arm}-multihop" --multihop "$TASK" --batch-size 256
done
