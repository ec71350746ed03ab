#!/usr/bin/env bash
# Submit onegen jobs (run on the login node, from the repository root). Creates logs/ first: SLURM
# does not create the directory of --output, and a job whose log cannot be opened fails silently.
#
#   slurm/launch.sh train  [OPTIONS...] [--] RECIPE.yaml [key=value ...]
#   slurm/launch.sh prep   [OPTIONS...] --  PREPARE_ARGS...      (job array + dependent finish)
#   slurm/launch.sh eval   [OPTIONS...] --  MODEL_DIR DATA_DIR [evaluation run options]
#   slurm/launch.sh mlflow [OPTIONS...] [--] [STORE_DIR]         (an MLflow server job, default runs/mlflow)
#
# Options before `--` go to every sbatch call (e.g. --partition=gpu --time=24:00:00 --account=X), except:
#   --mlflow-server=STORE_DIR  (train, eval) log to the MLflow server of STORE_DIR: one is submitted
#                              first (slurm/mlflow.sh) unless STORE_DIR/server.uri answers; the jobs start
#                              after it and read its URI there. Jobs on several nodes logging to one store need this.
#   --tracking-uri=URI         (train, eval) log to that MLflow server or store (exported as MLFLOW_TRACKING_URI)
# Environment: NODES and GPUS_PER_NODE (train: --nodes / --gpus-per-node), CPUS_PER_TASK
# (--cpus-per-task), PREP_TASKS (prep: array size, default 4). Prints the job ids, one per line, last.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export ONEGEN_ROOT="${ONEGEN_ROOT:-$root}"  # the jobs find the checkout wherever sbatch is called from
usage() { sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 2; }

[ $# -ge 1 ] || usage
kind="$1"
shift
opts=()
mlflow_dir=""
while [ $# -gt 0 ]; do
  case "$1" in
    --) shift; break ;;
    -h|--help) usage ;;
    --mlflow-server=*) mlflow_dir="${1#*=}"; shift ;;
    --tracking-uri=*) export MLFLOW_TRACKING_URI="${1#*=}"; shift ;;
    -*) opts+=("$1"); shift ;;
    *) break ;;
  esac
done
if [ -n "${CPUS_PER_TASK:-}" ]; then opts=(--cpus-per-task="$CPUS_PER_TASK" "${opts[@]}"); fi
mkdir -p logs
# `sbatch --parsable` prints "jobid" or "jobid;cluster".
submit() { local out; out="$(sbatch --parsable "$@")"; echo "${out%%;*}"; }

# --mlflow-server: the jobs read the server's URI from STORE_DIR/server.uri (slurm/common.sh); a server
# job is submitted first unless one answers there, and the jobs start after it has started.
server_job=""
use_mlflow_server() {
  [ -n "$mlflow_dir" ] || return 0
  mkdir -p "$mlflow_dir"
  local dir
  dir="$(cd "$mlflow_dir" && pwd)"
  export ONEGEN_MLFLOW_URI_FILE="$dir/server.uri"
  # shellcheck source=slurm/common.sh
  source "$root/slurm/common.sh"
  if [ -s "$ONEGEN_MLFLOW_URI_FILE" ] && onegen_mlflow_healthy "$(head -n1 "$ONEGEN_MLFLOW_URI_FILE")"; then
    echo "[launch] MLflow server of $dir at $(head -n1 "$ONEGEN_MLFLOW_URI_FILE")" >&2
    return 0
  fi
  server_job="$(submit "${opts[@]}" "$root/slurm/mlflow.sh" "$dir")"
  echo "[launch] MLflow server job $server_job for $dir · log logs/onegen-mlflow-$server_job.out · stop it when" \
    "the runs are done: scancel $server_job" >&2
  opts=(--dependency="after:$server_job" "${opts[@]}")
}

case "$kind" in
  train|eval) use_mlflow_server ;;
  *) [ -z "$mlflow_dir" ] || { echo "[launch] error: --mlflow-server is for train and eval jobs" >&2; exit 2; } ;;
esac
if [ -n "$server_job" ]; then echo "$server_job"; fi

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
  mlflow)
    job="$(submit "${opts[@]}" "$root/slurm/mlflow.sh" "$@")"
    echo "[launch] MLflow server job $job · log logs/onegen-mlflow-$job.out · its URI: ${1:-runs/mlflow}/server.uri" \
      "once it answers · stop it: scancel $job" >&2
    echo "$job"
    ;;
  *) usage ;;
esac
