#!/bin/bash
# Fine-tune on N nodes x G GPUs with Slurm: one `accelerate launch` per node, preemption-safe.
#
#   sbatch slurm/finetune.sh configs/x.yaml [--section.key=value ...]
#   sbatch --time=01:00:00 slurm/finetune.sh --data.root=PATH   # planned to end, tested, before the job does
#   sbatch --nodes=4 --gpus-per-node=4 --time=2:00:00 slurm/finetune.sh configs/x.yaml --optim.lr=3e-4
#   FINETUNE_CPU=1 FINETUNE_PROCS_PER_NODE=2 sbatch --gpus-per-node=0 -c 2 slurm/finetune.sh configs/x.yaml
#
# What happens:
# * The batch shell (on the first node) runs `srun` with one task per node; each task runs
#   `accelerate launch --num_machines $SLURM_NNODES --machine_rank $SLURM_NODEID ...` which starts
#   that node's G processes. Rendezvous: the first host of the allocation
#   (`scontrol show hostnames`) on port 20000 + SLURM_JOB_ID % 20000 (override: FINETUNE_PORT).
#   With one process in total the task runs `python trainer/main.py` directly (accelerate's
#   single-process launcher does not forward signals).
# * 120 s before the time limit Slurm sends SIGUSR1 to this shell (--signal=B:USR1@120). The trap
#   forwards it to every process of the job steps (scancel --signal), i.e. the accelerate/torchrun
#   agents, which forward it to their workers (PET_SIGNALS_TO_HANDLE below) and give them
#   TORCH_ELASTIC_SHUTDOWN_TIMEOUT s to exit. The trainer (trainer/distributed/signals.py) sets a flag, all
#   ranks agree at the next optimizer step, write one checkpoint and exit. When the step has
#   ended, this shell runs `scontrol requeue $SLURM_JOB_ID` (once; the trainer never requeues).
#   SIGTERM (preemption, scancel, time limit) is handled the same way.
# * The requeued job (SLURM_RESTART_COUNT=1, 2, ...) runs the same command; the trainer resumes
#   from the latest complete checkpoint in --train.output_dir. --open-mode=append keeps the log
#   of every run in one file.
#
# Defaults below are for one 8-GPU node; override any of them on the sbatch command line.
# Env knobs: FINETUNE_CPU=1 (gloo on CPUs; automatic when nvidia-smi finds no GPU),
# FINETUNE_PROCS_PER_NODE (default: GPUs on the node; 1 in CPU mode), FINETUNE_PORT,
# FINETUNE_ENTRY (default trainer/main.py), FINETUNE_ACCELERATE_CONFIG (accelerate --config_file),
# FINETUNE_SHUTDOWN_TIMEOUT (s a worker gets after the signal; default 100 < the 120 s lead),
# FINETUNE_RDZV_TIMEOUT (s a node waits for the others at start-up, multi-node; default 180).
#
#SBATCH --job-name=finetune
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

set -uo pipefail  # not -e: the exit status of `wait` is handled below

log() { echo "[finetune.sh $(date '+%F %T') job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0}] $*"; }

if [ $# -lt 1 ]; then
    echo "usage: sbatch slurm/finetune.sh [CONFIG.yaml] [--section.key=value ...]" >&2
    exit 2
fi
# Without a config file (the first argument is an option) the run is planned: finetune.strategy auto, to
# --train.time_budget or, when none is given, to this job's end time (trainer/planner/budget.py).
CONFIG=""
if [[ "$1" != --* ]]; then
    CONFIG=$1
    shift
fi

REPO=${SLURM_SUBMIT_DIR:-$(pwd)}
cd "$REPO" || { echo "finetune.sh: cannot cd to SLURM_SUBMIT_DIR=$REPO" >&2; exit 2; }
if [ -f "$REPO/.venv/bin/activate" ]; then
    # shellcheck disable=SC1091
    source "$REPO/.venv/bin/activate"
fi
ENTRY=${FINETUNE_ENTRY:-trainer/main.py}
[ -z "$CONFIG" ] || [ -f "$CONFIG" ] || { echo "finetune.sh: config file $CONFIG not found (relative to $REPO)" >&2; exit 2; }
CONFIG_ARGS=()
[ -n "$CONFIG" ] && CONFIG_ARGS=(--config "$CONFIG")

# ------------------------------------------------------------------ signals
REQUEUE=0
LAUNCH_PID=
on_signal() {
    local sig=$1
    REQUEUE=1
    log "got SIG$sig: forwarding it to the training processes; requeue when they have exited"
    if [ -n "$LAUNCH_PID" ]; then
        # every process of every job step (not this batch shell); the srun client as a fallback
        scancel --signal="$sig" "$SLURM_JOB_ID" || kill -s "$sig" "$LAUNCH_PID" 2>/dev/null
    fi
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM

# ------------------------------------------------------------------ topology
NNODES=${SLURM_NNODES:-1}
CPU=${FINETUNE_CPU:-0}
GPUS=0
if [ "$CPU" != 1 ]; then
    if command -v nvidia-smi >/dev/null 2>&1; then GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU'); fi
    GPUS=${SLURM_GPUS_ON_NODE:-$GPUS}
    [ "$GPUS" -ge 1 ] 2>/dev/null || CPU=1
fi
if [ "$CPU" = 1 ]; then
    PROCS_PER_NODE=${FINETUNE_PROCS_PER_NODE:-1}
else
    PROCS_PER_NODE=${FINETUNE_PROCS_PER_NODE:-$GPUS}
fi
NUM_PROCESSES=$((NNODES * PROCS_PER_NODE))
MAIN_IP=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" 2>/dev/null | head -n 1)
MAIN_IP=${MAIN_IP:-localhost}
PORT=${FINETUNE_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}

export FINETUNE_NNODES=$NNODES FINETUNE_NUM_PROCESSES=$NUM_PROCESSES FINETUNE_MAIN_IP=$MAIN_IP
export FINETUNE_PORT_USED=$PORT FINETUNE_ENTRY_USED=$ENTRY FINETUNE_CPU_MODE=$CPU
export FINETUNE_ACCELERATE_CONFIG=${FINETUNE_ACCELERATE_CONFIG:-}
export FINETUNE_RDZV_TIMEOUT=${FINETUNE_RDZV_TIMEOUT:-180}
# torchrun/accelerate agents: forward USR1 too, and wait this long for workers to checkpoint
export PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${FINETUNE_SHUTDOWN_TIMEOUT:-100}
export PYTHONUNBUFFERED=1
CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-1}
export SRUN_CPUS_PER_TASK=$CPUS_PER_TASK   # Slurm >= 22.05: srun no longer inherits -c
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( CPUS_PER_TASK / PROCS_PER_NODE > 0 ? CPUS_PER_TASK / PROCS_PER_NODE : 1 ))}

log "nodes=$NNODES procs/node=$PROCS_PER_NODE total=$NUM_PROCESSES cpu_mode=$CPU main=$MAIN_IP:$PORT entry=$ENTRY config=$CONFIG $*"

# Runs on every node (one srun task per node); SLURM_NODEID is that node's machine rank.
# shellcheck disable=SC2016
NODE_CMD='
if [ "$FINETUNE_NUM_PROCESSES" -eq 1 ]; then
    exec python "$FINETUNE_ENTRY_USED" "$@"
fi
args=(--num_machines "$FINETUNE_NNODES" --machine_rank "$SLURM_NODEID"
      --num_processes "$FINETUNE_NUM_PROCESSES" --multi_gpu
      --main_process_ip "$FINETUNE_MAIN_IP" --main_process_port "$FINETUNE_PORT_USED")
# a node that cannot reach the main node fails after this many s instead of the 600 s default
[ "$FINETUNE_NNODES" -gt 1 ] && args+=(--rdzv_conf "timeout=$FINETUNE_RDZV_TIMEOUT")
[ -n "$FINETUNE_ACCELERATE_CONFIG" ] && args+=(--config_file "$FINETUNE_ACCELERATE_CONFIG")
exec accelerate launch "${args[@]}" "$FINETUNE_ENTRY_USED" "$@"
'

if [ "$REQUEUE" = 1 ]; then  # signalled while starting up: nothing to stop
    log "signalled before launch; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi

# In the background + `wait`, so that the trap runs as soon as a signal arrives.
srun --nodes="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \
    bash -c "$NODE_CMD" finetune-node "${CONFIG_ARGS[@]}" "$@" &
LAUNCH_PID=$!

rc=0
while true; do
    wait "$LAUNCH_PID"
    rc=$?
    # wait returns >128 when a trapped signal interrupted it; the step is then still running
    kill -0 "$LAUNCH_PID" 2>/dev/null || break
done
log "training step ended with status $rc"

if [ "$REQUEUE" = 1 ]; then
    log "requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID" || { log "scontrol requeue failed"; exit 1; }
    exit 0
fi
exit "$rc"
