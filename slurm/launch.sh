#!/usr/bin/env bash
# Submit onegen jobs (run on the login node, from the repository root). Creates logs/ first: SLURM
# does not create the directory of --output, and a job whose log cannot be opened fails silently.
#
#   slurm/launch.sh train [SBATCH_OPTIONS...] [--] RECIPE.yaml [key=value ...]
#   slurm/launch.sh prep  [SBATCH_OPTIONS...] --  PREPARE_ARGS...      (job array + dependent finish)
#   slurm/launch.sh eval  [SBATCH_OPTIONS...] --  MODEL_DIR DATA_DIR [evaluation run options]
#
# Options before `--` go to every sbatch call (e.g. --partition=gpu --time=24:00:00 --account=X).
# Environment: NODES and GPUS_PER_NODE (train: --nodes / --gpus-per-node), CPUS_PER_TASK
# (--cpus-per-task), PREP_TASKS (prep: array size, default 4). Prints the job ids, one per line, last.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export ONEGEN_ROOT="${ONEGEN_ROOT:-$root}"  # the jobs find the checkout wherever sbatch is called from
usage() { sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 2; }

[ $# -ge 1 ] || usage
kind="$1"
shift
opts=()
while [ $# -gt 0 ]; do
  case "$1" in
    --) shift; break ;;
    -h|--help) usage ;;
    -*) opts+=("$1"); shift ;;
    *) break ;;
  esac
done
if [ -n "${CPUS_PER_TASK:-}" ]; then opts=(--cpus-per-task="$CPUS_PER_TASK" "${opts[@]}"); fi
mkdir -p logs
# `sbatch --parsable` prints "jobid" or "jobid;cluster".
submit() { local out; out="$(sbatch --parsable "$@")"; echo "${out%%;*}"; }

case "$kind" in
  train)
    [ $# -ge 1 ] || usage
    [ -z "${NODES:-}" ] || opts=(--nodes="$NODES" "${opts[@]}")
    [ -z "${GPUS_PER_NODE:-}" ] || opts=(--gpus-per-node="$GPUS_PER_NODE" "${opts[@]}")
    job="$(submit "${opts[@]}" "$root/slurm/train.sh" "$@")"
    echo "[launch] training job $job · log logs/onegen-train-$job.out · cancel: scancel $job" >&2
    echo "$job"
    ;;
  prep)
    [ $# -ge 1 ] || usage
    tasks="${PREP_TASKS:-4}"
    array="$(submit --array="0-$((tasks - 1))" "${opts[@]}" "$root/slurm/prep.sh" "$@")"
    finish="$(submit --dependency="afterok:$array" --kill-on-invalid-dep=yes --job-name=onegen-prep-finish \
      --export=ALL,ONEGEN_PREP_STEP=finish --output='logs/%x-%j.out' "${opts[@]}" "$root/slurm/prep.sh" "$@")"
    echo "[launch] prep array $array ($tasks tasks, logs/onegen-prep-${array}_*.out), then job $finish writes" \
      "the manifest (logs/onegen-prep-finish-$finish.out)" >&2
    echo "$array"
    echo "$finish"
    ;;
  eval)
    [ $# -ge 2 ] || usage
    job="$(submit "${opts[@]}" "$root/slurm/eval.sh" "$@")"
    echo "[launch] eval job $job · log logs/onegen-eval-$job.out" >&2
    echo "$job"
    ;;
  *) usage ;;
esac
