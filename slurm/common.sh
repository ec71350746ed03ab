#!/usr/bin/env bash
# Sourced by slurm/{train,prep,eval,mlflow}.sh in the batch step (never run on its own; launch.sh sources it
# for onegen_mlflow_healthy). Each job script finds it in the checkout, sources it and calls onegen_job_start.
#
# SLURM runs a *copy* of the batch script from its spool directory, so "the directory of this script"
# is useless there: the checkout is $ONEGEN_ROOT, else the directory sbatch was called from
# ($SLURM_SUBMIT_DIR). It must be on a filesystem every node sees.
#
#   ONEGEN_ROOT   the onegen checkout (default: $SLURM_SUBMIT_DIR, i.e. submit from the repo root)
#   ONEGEN_VENV   virtual environment to activate (default: $ONEGEN_ROOT/.venv when it exists; set it
#                 to "none" to use whatever python is on PATH, e.g. from `module load` or conda)
#   PYTHON        the interpreter (default: python of the activated environment)

onegen_log() { echo "[slurm $(date '+%F %T')] $*"; }

onegen_die() { echo "[slurm] error: $*" >&2; exit 2; }

# Find the checkout, activate its environment, load scripts/env.sh, cd into it.
onegen_setup() {
  ONEGEN_ROOT="${ONEGEN_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}"
  if [ ! -f "$ONEGEN_ROOT/pipeline/train.py" ]; then
    onegen_die "$ONEGEN_ROOT is not an onegen checkout: submit from the repository root or set ONEGEN_ROOT"
  fi
  ONEGEN_ROOT="$(cd "$ONEGEN_ROOT" && pwd)"
  export ONEGEN_ROOT
  local venv="${ONEGEN_VENV:-$ONEGEN_ROOT/.venv}"
  if [ "$venv" != "none" ]; then
    if [ -f "$venv/bin/activate" ]; then
      # shellcheck disable=SC1091  # the venv is created by scripts/bootstrap.sh, not part of the repo
      source "$venv/bin/activate"
    elif [ -n "${ONEGEN_VENV:-}" ]; then
      onegen_die "ONEGEN_VENV=$ONEGEN_VENV has no bin/activate"
    fi
  fi
  PYTHON="${PYTHON:-$(command -v python || command -v python3 || echo python)}"
  export PYTHON
  # shellcheck source=scripts/env.sh
  source "$ONEGEN_ROOT/scripts/env.sh"
  export PYTHONUNBUFFERED=1  # log lines reach logs/ as they happen, not at exit
  cd "$ONEGEN_ROOT" || onegen_die "cannot cd to $ONEGEN_ROOT"
}

# One line per job (and per requeue) that says what runs where.
onegen_banner() {
  onegen_log "job ${SLURM_JOB_ID:-?}${SLURM_ARRAY_TASK_ID:+ (array task $SLURM_ARRAY_TASK_ID)} '${SLURM_JOB_NAME:-?}'" \
    "on ${SLURM_JOB_NODELIST:-$(hostname)} · restart ${SLURM_RESTART_COUNT:-0} · checkout $ONEGEN_ROOT" \
    "· python $(command -v "$PYTHON" || echo "$PYTHON")"
}

# The start of every job script: onegen_setup, then onegen_banner; with --mlflow-server (train, eval),
# then onegen_mlflow_from_server; --no-mlflow-server (prep, the MLflow server job itself) stops there.
onegen_job_start() {
  case "${1:-}" in --mlflow-server|--no-mlflow-server) ;; *) onegen_die "onegen_job_start: unknown option '${1:-}'" ;; esac
  onegen_setup
  onegen_banner
  if [ "$1" = --mlflow-server ]; then onegen_mlflow_from_server; fi
}

# The first host of the allocation: torchrun's rendezvous (MASTER_ADDR) lives there.
onegen_master_addr() {
  local first
  # `|| true`: head may close the pipe before scontrol has written a long host list (SIGPIPE).
  first="$(scontrol show hostnames "${SLURM_JOB_NODELIST:?not inside a SLURM allocation}" | head -n1 || true)"
  [ -n "$first" ] || onegen_die "scontrol could not expand SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST"
  echo "$first"
}

# A port derived from the job id: stable across requeues of the same job, different between jobs
# that share a node.
onegen_master_port() {
  echo $((20000 + ${SLURM_JOB_ID:?not inside a SLURM allocation} % 20000))
}

# GPUs per node: $GPUS_PER_NODE, else what SLURM allocated (--gpus-per-node / --gres), else 0 (CPU).
onegen_gpus_per_node() {
  local n="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-0}}}"
  n="${n##*:}"     # "a100:8" -> 8
  n="${n%%(*}"     # "8(x2)"  -> 8
  case "$n" in ''|*[!0-9]*) n=0 ;; esac
  echo "$n"
}

# This node's cluster-internal address, for a server other nodes reach: MLFLOW_HOST, else the first
# address `hostname -I` lists, else what the host name resolves to. Never 0.0.0.0 (no authentication).
onegen_internal_addr() {
  local a="${MLFLOW_HOST:-}"
  if [ -z "$a" ]; then a="$(hostname -I 2>/dev/null | awk '{print $1}' || true)"; fi
  if [ -z "$a" ]; then a="$(hostname -i 2>/dev/null | awk '{print $1}' || true)"; fi
  case "$a" in
    ''|0.0.0.0|::|'[::]') onegen_die "no cluster-internal address to bind the MLflow server to (got '$a'): set MLFLOW_HOST" ;;
  esac
  echo "$a"
}

# Whether an MLflow server answers /health at URI (0 = yes), within 5 s.
onegen_mlflow_healthy() {
  "${PYTHON:-python3}" -c 'import sys, urllib.request
try:
    sys.exit(0 if urllib.request.urlopen(sys.argv[1].rstrip("/") + "/health", timeout=5).status == 200 else 1)
except Exception:
    sys.exit(1)' "$1"
}

# Jobs submitted with `slurm/launch.sh ... --mlflow-server=DIR` log to that store's server: wait for the
# URI file its job writes once it answers (ONEGEN_MLFLOW_URI_FILE, up to ONEGEN_MLFLOW_WAIT s, default
# 600) and export MLFLOW_TRACKING_URI from it. No server by then: a warning, and the job logs where it
# would without one (results stay on disk either way; `python -m evaluation log` moves an eval's later).
onegen_mlflow_from_server() {
  local f="${ONEGEN_MLFLOW_URI_FILE:-}" waited=0
  [ -n "$f" ] || return 0
  while [ ! -s "$f" ]; do
    if [ -n "${ONEGEN_DRY_RUN:-}" ] || [ "$waited" -ge "${ONEGEN_MLFLOW_WAIT:-600}" ]; then
      onegen_log "warning: no MLflow server URI in $f after ${waited}s (is its job running? squeue -n onegen-mlflow)"
      return 0
    fi
    sleep 5
    waited=$((waited + 5))
  done
  MLFLOW_TRACKING_URI="$(head -n1 "$f")"
  export MLFLOW_TRACKING_URI
  onegen_log "MLflow: the tracking server of $(dirname "$f") at $MLFLOW_TRACKING_URI"
}
