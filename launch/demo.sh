#!/usr/bin/env bash
# The README's demo: real corpus -> tokenizer + shards -> tiny RDT and tiny dense baseline, each
# trained with 2 CPU ranks through the real `deepspeed` launcher on identical data; then both are
# evaluated (python -m mythos.eval), a tiny depth-extrapolation experiment runs (launch/multihop.sh)
# and launch/compare.py writes runs/demo/report/report.md with plots.
# Re-running continues where it stopped (data prep skips finished work; training resumes from
# the newest complete checkpoint, and a finished run is left as it is).
#   DEMO_STEPS=300 make demo        # more steps (default 200 per model)
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
STEPS=${DEMO_STEPS:-200}
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore::FutureWarning
START=$(date +%s)

free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
phase() { printf '\n=== %s (t+%ss) ===\n' "$1" "$(( $(date +%s) - START ))"; }

phase "1/5 demo corpus: gather real prose, train the tokenizer, write shards"
"$PY" -m data_prep.demo_corpus --out data/demo

for arm in rdt dense; do
  phase "2/5 train ${arm}-tiny on 2 CPU ranks (${STEPS} steps)"
  "$PY" -m deepspeed.launcher.runner --num_gpus 2 --master_port "$(free_port)" --log_level warning \
    launch/pretrain.py --config "configs/run/${arm}-tiny-cpu.yaml" "train.max_steps=${STEPS}"
done

phase "3/5 results"
"$PY" - <<'PY'
import json
from pathlib import Path

for arm in ("rdt-tiny", "dense-tiny"):
    run = Path("runs/demo") / arm
    info = json.loads((run / "run_info.json").read_text())
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]
    train = [r for r in rows if "train/loss" in r]
    val = [r for r in rows if "val/loss" in r]
    tok_s = sorted(r["perf/tokens_per_s"] for r in train)[len(train) // 2]
    loops = "  ".join(f"T={k.split('@')[1]}: {v:.3f}" for k, v in val[-1].items() if k.startswith("val/loss@"))
    print(f"{arm:11s} params {info['params'] / 1e6:.2f}M | final train loss {train[-1]['train/loss']:.3f} | "
          f"val loss {val[-1]['val/loss']:.3f} | median {tok_s:.0f} tok/s | data {info['data_fingerprint'][:16]}")
    if loops:
        print(f"{'':11s} val loss by loop count: {loops}")
PY
phase "4/5 evaluate both runs (val loss / bpb per loop count) and the depth-extrapolation experiment"
for arm in rdt dense; do
  # one process: let it use both cores (the 2-rank trainings above use one thread per rank)
  OMP_NUM_THREADS=2 "$PY" -m mythos.eval --run "runs/demo/${arm}-tiny" --loops 1,2,4,8,16,32 --batch-size 32
done
bash launch/multihop.sh

phase "5/5 report"
"$PY" launch/compare.py --a runs/demo/rdt-tiny --b runs/demo/dense-tiny --out runs/demo/report \
  --multihop runs/demo/rdt-multihop runs/demo/dense-multihop
echo "report: runs/demo/report/report.md (plots beside it)"

echo
echo "demo finished in $(( $(date +%s) - START ))s"
echo "tensorboard logs: runs/demo/rdt-tiny/tensorboard and runs/demo/dense-tiny/tensorboard"
echo "  view them with: .venv/bin/tensorboard --logdir runs/demo"
