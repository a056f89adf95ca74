#!/usr/bin/env bash
# Submit a partitioned data-prep build: an array job (one task per partition) and a merge job
# that runs after every task succeeded (afterok). Prints the job ids on stdout:
#
#   array_job_id=1234
#   merge_job_id=1235
#
# Usage (from the repo root):
#   launch/slurm/submit_data_prep.sh -n N [-c CPUS] [-t TIME] [--only LIST] [--log-dir DIR]
#       [--sbatch "EXTRA SBATCH OPTIONS"] -- SHARD_ARGS...
#
#   -n N          number of partitions (array tasks 0..N-1); part of the build's identity
#   -c CPUS       cpus per task (default 16); the task runs CPUS-1 tokenizer workers
#   -t TIME       time limit per task (default 12:00:00)
#   --only LIST   submit only these array indices (e.g. "2,5" after two tasks failed); the
#                 merge then waits for them. Resubmitting everything is also fine: complete
#                 partitions are verified and skipped.
#   --log-dir DIR where SLURM writes the task logs (default logs/data_prep)
#   SHARD_ARGS    the python -m data_prep.shard arguments, with --out; identical for every
#                 (re)submission of the same build
#
# A failed task leaves the merge job unsatisfiable; it is cancelled (--kill-on-invalid-dep=yes),
# and a resubmission with --only brings a new merge job.
set -euo pipefail

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
    exit 2
}

N="" CPUS=16 TIME=12:00:00 ONLY="" LOGDIR=logs/data_prep EXTRA=""
while (($#)); do
    case $1 in
    -n) N=$2; shift 2 ;;
    -c) CPUS=$2; shift 2 ;;
    -t) TIME=$2; shift 2 ;;
    --only) ONLY=$2; shift 2 ;;
    --log-dir) LOGDIR=$2; shift 2 ;;
    --sbatch) EXTRA=$2; shift 2 ;;
    --) shift; break ;;
    -h | --help) usage ;;
    *) echo "error: unknown option $1 (shard arguments go after --)" >&2; exit 2 ;;
    esac
done
[[ $N =~ ^[1-9][0-9]*$ ]] || { echo "error: -n N (number of partitions) is required" >&2; exit 2; }
(($#)) || { echo "error: no data_prep.shard arguments after --" >&2; exit 2; }

OUT=""
args=("$@")
for ((k = 0; k < ${#args[@]}; k++)); do
    case ${args[k]} in
    --out) OUT=${args[k + 1]:-} ;;
    --out=*) OUT=${args[k]#--out=} ;;
    --num-partitions | --num-partitions=* | --partition | --partition=* | --workers | --workers=*)
        echo "error: ${args[k]} is set by the array job; remove it from the shard arguments" >&2
        exit 2
        ;;
    esac
done
[[ -n $OUT ]] || { echo "error: the shard arguments need --out DIR" >&2; exit 2; }

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# The jobs find the code through MYTHOS_ROOT (sbatch exports the environment) and resolve
# relative paths in the arguments against the current directory (the submit dir).
export MYTHOS_ROOT=${MYTHOS_ROOT:-$(cd "$HERE/../.." && pwd)}
mkdir -p "$LOGDIR"
ARRAY=${ONLY:-0-$((N - 1))}
# shellcheck disable=SC2086  # EXTRA is a list of options on purpose
array_id=$(sbatch --parsable $EXTRA --array="$ARRAY" --cpus-per-task="$CPUS" --time="$TIME" \
    --output="$LOGDIR/%x-%A_%a.out" "$HERE/data_prep.sbatch" partition "$N" "$@")
array_id=${array_id%%;*}
# shellcheck disable=SC2086
merge_id=$(sbatch --parsable $EXTRA --dependency=afterok:"$array_id" --kill-on-invalid-dep=yes \
    --cpus-per-task=1 --time="$TIME" --job-name=mythos-data-merge --output="$LOGDIR/%x-%j.out" \
    "$HERE/data_prep.sbatch" merge "$OUT")
merge_id=${merge_id%%;*}
echo "array_job_id=$array_id"
echo "merge_job_id=$merge_id"
