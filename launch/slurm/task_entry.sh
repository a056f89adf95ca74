#!/usr/bin/env bash
# One SLURM task = one training rank. pretrain.sbatch starts this with `srun`, once per GPU (or
# per CPU rank); it maps SLURM's task ids onto the env contract of mythos.dist and then *execs*
# the training command, so the Python process is the task itself: signals that SLURM (or srun,
# forwarding the batch script's pre-timeout USR1) sends to the step reach the trainer directly,
# with no launcher agent in between that could swallow them or kill the rank instead.
#
#   srun ... launch/slurm/task_entry.sh PYTHON launch/pretrain.py --config X.yaml [key=value ...]
#
# Output lines get a "[node:rank] " prefix.
set -euo pipefail

: "${SLURM_PROCID:?task_entry.sh must run under srun}"
export RANK=$SLURM_PROCID
export LOCAL_RANK=$SLURM_LOCALID
export WORLD_SIZE=$SLURM_NTASKS
export NODE_RANK=$SLURM_NODEID
if [[ -z ${MASTER_ADDR:-} ]]; then # normally exported by pretrain.sbatch
    mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
    export MASTER_ADDR=${hosts[0]}
fi
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}

# Shards, sockets and NCCL's files need many descriptors; raise the soft limit to the hard one.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

node=${SLURMD_NODENAME:-$(hostname -s)}

# GPU nodes: local rank 0 checks that the node's GPUs answer before joining the rendezvous, so a
# broken node fails this job in seconds instead of hanging every rank until the NCCL timeout.
if [[ $LOCAL_RANK == 0 && ${DS_ACCELERATOR:-} != cpu ]] && command -v nvidia-smi >/dev/null 2>&1; then
    if ! timeout 60 nvidia-smi -L >/dev/null 2>&1; then
        echo "[$node:$RANK] error: nvidia-smi failed on $node (bad GPU or driver); failing the step" >&2
        exit 1
    fi
fi

# Prefix every line with node:rank. The prefixer ignores USR1/TERM: SLURM signals every process
# of the step, and it must outlive the trainer (it exits at EOF, after the trainer's last line).
exec > >(
    trap '' USR1 TERM
    exec sed -u "s|^|[$node:$RANK] |"
) 2>&1

exec "$@"
