#!/usr/bin/env bash
# GPU acceptance check, one command on one GPU (target: under 8 minutes on an H100/H200):
#
#   bash bench/gpu_check.sh [OUT_DIR]          # or: make gpu-check
#
# 1. the `gpu`-marked tests: a 1-GPU DeepSpeed bf16 run of both tiny models with
#    train.compile=true, resumed from its middle checkpoint (tests/e2e/test_gpu.py), and
#    `python -m mythos.eval --device cuda` (bf16 and fp32 against CPU; tests/e2e/test_eval.py);
# 2. bench/gpu_mfu.py for dense-1.3b and rdt-770m at seq 2048, bf16, compile off (compile on
#    takes minutes per model: run `python bench/gpu_mfu.py` separately for it);
# 3. one summary table (also in OUT_DIR/summary.md).
#
# Without CUDA it prints one line and exits 0 (nothing to check here).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${1:-${OUT:-runs/gpu_check}}
mkdir -p "$OUT"

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA device visible to $PY; skipped (run it on a GPU node)"
    exit 0
fi
"$PY" -c "import torch; print('gpu_check:', torch.cuda.get_device_name(0), '| torch', torch.__version__)"
start=$(date +%s)

tests_rc=0
"$PY" -m pytest -q -m gpu -p no:cacheprovider tests/e2e/test_gpu.py tests/e2e/test_eval.py 2>&1 \
    | tee "$OUT/gpu_tests.log" || tests_rc=$?
tests_line=$(grep -E "passed|failed|error" "$OUT/gpu_tests.log" | tail -1)
tests_s=$(( $(date +%s) - start ))

mfu_rc=0
"$PY" bench/gpu_mfu.py --models dense-1.3b rdt-770m --compile off --steps 10 \
    --json "$OUT/gpu_mfu.json" 2>&1 | tee "$OUT/gpu_mfu.log" || mfu_rc=$?
total_s=$(( $(date +%s) - start ))

"$PY" - "$OUT" "$tests_rc" "$tests_line" "$tests_s" "$total_s" <<'PYEOF'
import json, sys
from pathlib import Path
out, tests_rc, tests_line, tests_s, total_s = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
lines = ["| check | result |", "|---|---|",
         f"| gpu-marked tests ({tests_s} s) | {'PASS' if tests_rc == 0 else 'FAIL'}: {tests_line} |"]
mfu = out / "gpu_mfu.json"
if mfu.exists():
    data = json.loads(mfu.read_text())
    lines[0:0] = [f"device: {data['device']}", ""]
    for r in data["results"]:
        if "error" in r:
            lines.append(f"| {r['model']} | FAIL: {r['error']} |")
            continue
        pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"  # noqa: E731
        loops = "" if r.get("loops_executed") is None else (
            f", loops E[T] {r['loops_expected']:.2f} / executed {r['loops_executed']:.2f}")
        lines.append(f"| {r['model']} mb={r['micro_batch']} | {r['tokens_per_s']:.0f} tok/s, MFU {pct(r['mfu'])}, "
                     f"HFU {pct(r['hfu'])}, peak {r['peak_mem_gib']:.1f} GiB{loops} |")
else:
    lines.append("| gpu_mfu | FAIL: no results |")
lines.append(f"| total wall time | {total_s} s |")
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n" + "\n".join(lines))
PYEOF
exit $(( tests_rc != 0 || mfu_rc != 0 ))
