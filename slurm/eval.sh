#!/usr/bin/env bash
# Evaluate a trained checkpoint on a prepared dataset: build (or reuse) its document index, then run
# one method, logging to the same MLflow store as training. Submit from the repository root:
#
#   sbatch slurm/eval.sh runs/qwen2-multihop/model runs/hotpot_dev
#   sbatch slurm/eval.sh runs/qwen2-multihop/model runs/hotpot_dev --method two-pass --max-examples 500
#   MLFLOW_TRACKING_URI=http://mlflow-host:5000 slurm/launch.sh eval -- MODEL DATA
#
# Arguments: MODEL_DIR (pipeline/train.py's OUTPUT/model), DATA_DIR (data_prep output), then any
# `python -m evaluation run` options (--method, --max-examples, --setting, --k, ...).
# Environment:
#   MLFLOW_TRACKING_URI  MLflow server or store (default "train": the store of the checkpoint's own
#                        training run, where the eval run is linked to it); with ONEGEN_MLFLOW_URI_FILE
#                        (`slurm/launch.sh --mlflow-server=DIR`) read from the MLflow server job's URI file
#   MLFLOW_EXPERIMENT    experiment name (default onegen)
#   INDEX_DIR            where the index goes (default runs/index/<model run>-<dataset>; reused when
#                        complete for the same checkpoint + data)
#   EVAL_OUT             results dir (default: the evaluation CLI's runs/eval/<dataset>-<method>-<model>)
#
#SBATCH --job-name=onegen-eval
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
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
[ $# -ge 2 ] || onegen_die "usage: sbatch slurm/eval.sh MODEL_DIR DATA_DIR [evaluation run options]"
model="$1" data="$2"
shift 2
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"

method=onegen
prev=""
for a in "$@"; do  # the method decides whether the checkpoint's own index is needed
  case "$a" in --method=*) method="${a#--method=}" ;; esac
  if [ "$prev" = "--method" ]; then method="$a"; fi
  prev="$a"
done
model_abs="$(cd "$model" 2>/dev/null && pwd || echo "$model")"
model_name="$(basename "$model_abs")"
if [ "$model_name" = model ]; then model_name="$(basename "$(dirname "$model_abs")")"; fi  # OUTPUT/model -> OUTPUT
index="${INDEX_DIR:-runs/index/${model_name}-$(basename "$data")}"

run=("$PYTHON" -m evaluation run --model "$model" --data "$data" --method "$method"
     --tracking-uri "${MLFLOW_TRACKING_URI:-train}" --experiment "${MLFLOW_EXPERIMENT:-onegen}" --quiet)
if [ -n "${EVAL_OUT:-}" ]; then run+=(--out "$EVAL_OUT"); fi
sharded=""
for a in "$@"; do case "$a" in --shard|--shard=*|--merge|--merge=*) sharded=1 ;; esac; done
case "$method" in
  onegen|two-pass)
    # A shard (or the merge) of a sharded run uses the index built before it: the tasks of an array
    # would otherwise all build the same one (docs/slurm.md, "Sharded").
    if [ -n "$sharded" ]; then index_cmd=()
    else index_cmd=("$PYTHON" -m evaluation index --model "$model" --data "$data" --out "$index" --quiet); fi
    run+=(--index "$index") ;;
  *) index_cmd=() ;;
esac
run+=("$@")

if [ ${#index_cmd[@]} -gt 0 ]; then
  onegen_log "index: $(printf '%q ' "${index_cmd[@]}")"
  if [ -z "${ONEGEN_DRY_RUN:-}" ]; then "${index_cmd[@]}"; fi
fi
onegen_log "eval: $(printf '%q ' "${run[@]}")"
if [ -n "${ONEGEN_DRY_RUN:-}" ]; then exit 0; fi
exec "${run[@]}"
