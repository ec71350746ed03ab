#!/usr/bin/env bash
# Data preparation (`python -m data_prep prepare`) as a SLURM job array plus one finishing job.
# Each array task writes its slice of the query and document shards (index = task mod tasks); the
# finishing job, started only when every task succeeded, checks that all shards exist and writes
# quarantine.jsonl and manifest.json: the same manifest fingerprint as one `prepare` on one machine.
# slurm/launch.sh submits both (from the repository root):
#
#   PREP_TASKS=8 slurm/launch.sh prep -- --kind hotpotqa --input data/train.json --out runs/hotpot --tokenizer smollm2
#
# or by hand:
#   a=$(sbatch --parsable --array=0-7 slurm/prep.sh --kind hotpotqa --input ... --out runs/hotpot ...)
#   sbatch --dependency=afterok:${a%;*} --export=ALL,ONEGEN_PREP_STEP=finish --output='logs/%x-%j.out' \
#       slurm/prep.sh --kind hotpotqa --input ... --out runs/hotpot ...
#
# Outside an array (and without ONEGEN_PREP_STEP=finish) it runs the whole `prepare` in one job.
# Give every job the same arguments: the shards and the manifest depend only on their content.
# A task that dies leaves only complete shards; resubmitting the array redoes only the missing ones.
#
#SBATCH --job-name=onegen-prep
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=4
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%A_%a.out
set -euo pipefail

# SLURM runs a copy of this script from its spool dir: the checkout (and its slurm/common.sh, which
# does the rest of the start) is $ONEGEN_ROOT, else the directory sbatch was called from.
checkout="${ONEGEN_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}"
[ -f "$checkout/slurm/common.sh" ] || { echo "[slurm] error: $checkout is not an onegen checkout: submit from the repository root or set ONEGEN_ROOT" >&2; exit 2; }
# shellcheck source=slurm/common.sh
source "$checkout/slurm/common.sh"
onegen_job_start --no-mlflow-server
[ $# -gt 0 ] || onegen_die "usage: sbatch --array=0-N slurm/prep.sh PREPARE_ARGS... (see python -m data_prep prepare --help)"

# Worker processes = the task's CPUs (num_proc changes no output byte); an explicit --num-proc wins.
cmd=("$PYTHON" -m data_prep prepare --num-proc "${SLURM_CPUS_PER_TASK:-1}")
if [ "${ONEGEN_PREP_STEP:-}" = finish ]; then
  cmd+=(--finish-only)
elif [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then
  # 0-based position in the array, whatever its first index (--array=1-8 works too).
  task=$((SLURM_ARRAY_TASK_ID - ${SLURM_ARRAY_TASK_MIN:-0}))
  cmd+=(--only-shards "$task/${SLURM_ARRAY_TASK_COUNT:?SLURM_ARRAY_TASK_COUNT unset}")
fi
cmd+=("$@")
onegen_log "$(printf '%q ' "${cmd[@]}")"
if [ -n "${ONEGEN_DRY_RUN:-}" ]; then exit 0; fi
exec "${cmd[@]}"
