#!/usr/bin/env bash
# OneGen training on a SLURM cluster: one srun task per node, each starting torchrun for the GPUs of
# its node (nodes x GPUs ranks in all). Submit from the repository root (docs/slurm.md):
#
#   sbatch slurm/train.sh configs/qwen2-1.5b-multihop.yaml                  # 1 node x 8 GPUs
#   sbatch --nodes=4 --gpus-per-node=8 slurm/train.sh configs/X.yaml optim.max_steps=2000
#   NODES=4 GPUS_PER_NODE=8 slurm/launch.sh train configs/X.yaml            # same; creates logs/
#   sbatch --gpus-per-node=0 --cpus-per-task=8 slurm/train.sh configs/tiny-cpu.yaml   # CPU nodes (gloo)
#
# Arguments: a YAML recipe (or --config FILE), then key=value overrides, passed to pipeline/train.py
# unchanged (relative paths are relative to the repository root). $MLFLOW_TRACKING_URI, when set,
# becomes mlflow_tracking_uri= (an explicit override still wins); with ONEGEN_MLFLOW_URI_FILE (set by
# `slurm/launch.sh --mlflow-server=DIR`) it is read from the MLflow server job's URI file first.
#
# Preemption / time limit: SLURM sends USR1 to this batch shell 120 s before the end (--signal). The
# trap below forwards it to the training step; the trainer finishes its current step, writes a
# checkpoint and exits 0; then this script requeues the job (`scontrol requeue`), which reruns the
# same command later, and the trainer resumes from the latest complete checkpoint. `scancel` (TERM)
# lets the trainer checkpoint within KillWait and does not requeue.
#
# CPUs: one srun task per node runs every rank of that node, so the task asks for the node's share of
# CPUs: --cpus-per-task=64 (8 per GPU for 8 GPUs; data loading, NCCL proxy threads, the optimizer).
# Without it a cluster whose default is one CPU per task puts all eight ranks on one core. Override
# with `sbatch --cpus-per-task=N` (or CPUS_PER_TASK=N slurm/launch.sh ...) for nodes with fewer CPUs
# or fewer GPUs; the per-node step gets the same count and OMP_NUM_THREADS = CPUs / ranks.
#
# Environment: GPUS_PER_NODE (default: what SLURM allocated; 0 = CPU, gloo), CPU_PROCS_PER_NODE
# (CPU ranks per node, default min(2, CPUs)), MASTER_PORT (default 20000 + job id % 20000),
# ONEGEN_MAX_REQUEUES (default 20), ONEGEN_DRY_RUN=1 (print each node's command, start nothing),
# ONEGEN_ROOT / ONEGEN_VENV / PYTHON (slurm/common.sh).
#
#SBATCH --job-name=onegen-train
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
set -euo pipefail

# SLURM runs a copy of this script from its spool dir: the checkout (and its slurm/common.sh, which
# does the rest of the start) is $ONEGEN_ROOT, else the directory sbatch was called from.
checkout="${ONEGEN_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}"
[ -f "$checkout/slurm/common.sh" ] || { echo "[slurm] error: $checkout is not an onegen checkout: submit from the repository root or set ONEGEN_ROOT" >&2; exit 2; }
# shellcheck source=slurm/common.sh
source "$checkout/slurm/common.sh"
onegen_job_start --mlflow-server  # MLFLOW_TRACKING_URI from the URI file of launch.sh --mlflow-server

[ $# -gt 0 ] || onegen_die "usage: sbatch slurm/train.sh RECIPE.yaml [key=value ...]"
args=()
case "$1" in
  *.yaml|*.yml) args+=(--config "$1"); shift ;;
esac
case " $* " in
  *" mlflow_tracking_uri="*) ;;
  *) if [ -n "${MLFLOW_TRACKING_URI:-}" ]; then args+=("mlflow_tracking_uri=$MLFLOW_TRACKING_URI"); fi ;;
esac
args+=("$@")

MASTER_ADDR="$(onegen_master_addr)"
MASTER_PORT="${MASTER_PORT:-$(onegen_master_port)}"
GPUS_PER_NODE="$(onegen_gpus_per_node)"
export MASTER_ADDR MASTER_PORT GPUS_PER_NODE
# A job requeued after its node was lost finds that node's lock on output_dir with a fresh heartbeat
# (stale only after 120 s, onegen/runlock.py): wait for it to go stale instead of refusing at once.
export ONEGEN_LOCK_WAIT_S="${ONEGEN_LOCK_WAIT_S:-180}"
onegen_log "${SLURM_NNODES:-1} node(s) x $([ "$GPUS_PER_NODE" -gt 0 ] && echo "$GPUS_PER_NODE GPU(s)" || echo "CPU ranks") ·" \
  "rendezvous $MASTER_ADDR:$MASTER_PORT · pipeline/train.py ${args[*]}"

# Runs once per node (srun --ntasks-per-node=1). Single quotes: SLURM_NODEID, SLURM_NNODES and the
# CPU count are expanded there, on each node, never here in the batch step.
# shellcheck disable=SC2016
node_script='
set -euo pipefail
# The CPUs of this step: srun --cpus-per-task sets SLURM_CPUS_PER_TASK here (else the whole node).
cpus="${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-$(nproc)}}"
if [ "${GPUS_PER_NODE:-0}" -gt 0 ]; then
  nproc="$GPUS_PER_NODE"
  # A hung collective (a dead peer) raises instead of blocking until the job time limit.
  export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
  export NCCL_ASYNC_ERROR_HANDLING="${NCCL_ASYNC_ERROR_HANDLING:-1}"
  export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
else
  # CPU nodes: gloo (the trainer picks the backend from CUDA availability); threads split over ranks.
  nproc="${CPU_PROCS_PER_NODE:-$(( cpus < 2 ? cpus : 2 ))}"
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( cpus / nproc > 0 ? cpus / nproc : 1 ))}"
cmd=("${PYTHON:-python}" -m torch.distributed.run
     --nnodes "$SLURM_NNODES" --node_rank "$SLURM_NODEID" --nproc_per_node "$nproc"
     --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --max_restarts 0
     pipeline/train.py "$@")
env_shown="OMP_NUM_THREADS=$OMP_NUM_THREADS"
for v in NCCL_DEBUG NCCL_ASYNC_ERROR_HANDLING TORCH_NCCL_ASYNC_ERROR_HANDLING; do
  if [ -n "${!v:-}" ]; then env_shown+=" $v=${!v}"; fi
done
echo "[node $SLURM_NODEID/$SLURM_NNODES $(hostname)] env: $env_shown; cmd: $(printf "%q " "${cmd[@]}")"
if [ -n "${ONEGEN_DRY_RUN:-}" ]; then exit 0; fi
# torchrun ignores USR1 (its default action would kill it and orphan the ranks); the ranks install
# their own handler. SLURM signals every process of the step, and this shell forwards USR1 to the
# ranks as well, in case a site delivers it to the task alone.
( trap "" USR1; exec "${cmd[@]}" ) &
pid=$!
trap "kill -USR1 \$(pgrep -P \$pid) 2>/dev/null || true" USR1
trap "kill -TERM \$pid 2>/dev/null || true" TERM INT
while :; do
  rc=0; wait "$pid" || rc=$?
  kill -0 "$pid" 2>/dev/null || break   # still running: wait was interrupted by a signal
done
exit "$rc"
'

requeue=0
cancelled=0
# shellcheck disable=SC2317  # trap handlers: invoked by the traps below
on_usr1() {
  onegen_log "USR1 (time limit or preemption): asking the trainer to checkpoint and stop"
  requeue=1
  scancel --signal=USR1 "$SLURM_JOB_ID" || true   # every step, not this batch shell
}
# shellcheck disable=SC2317
on_term() {
  onegen_log "TERM: the job is being cancelled; the trainer checkpoints if KillWait allows; no requeue"
  cancelled=1
}
trap on_usr1 USR1
trap on_term TERM

cpus_per_task="${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}"
srun --nodes="${SLURM_NNODES:-1}" --ntasks-per-node=1 --cpus-per-task="$cpus_per_task" --kill-on-bad-exit=1 \
  bash -c "$node_script" onegen-node "${args[@]}" &
srun_pid=$!
# A trapped signal interrupts `wait`; keep waiting until the step has really ended.
while :; do
  rc=0; wait "$srun_pid" || rc=$?
  kill -0 "$srun_pid" 2>/dev/null || break
done

if [ "$requeue" = 1 ] && [ "$cancelled" = 0 ] && [ -z "${ONEGEN_DRY_RUN:-}" ]; then
  restarts="${SLURM_RESTART_COUNT:-0}"
  if [ "$rc" != 0 ]; then
    onegen_log "the training step failed (exit $rc) after the signal: not requeuing"
  elif [ "$restarts" -ge "${ONEGEN_MAX_REQUEUES:-20}" ]; then
    onegen_log "requeued $restarts times already (ONEGEN_MAX_REQUEUES): not requeuing; resubmit to continue"
  else
    onegen_log "checkpoint written; requeuing job $SLURM_JOB_ID (restart $((restarts + 1))): it resumes from the checkpoint"
    trap - TERM  # the requeue ends this shell with TERM: not a cancellation
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
fi
onegen_log "training step ended with exit code $rc"
exit "$rc"
