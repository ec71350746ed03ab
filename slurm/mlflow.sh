#!/usr/bin/env bash
# An MLflow tracking server as a SLURM job, for jobs on several nodes that log to one store: a sqlite
# file on a shared filesystem written from several nodes is not safe (NFS locking), one server
# process writing it is. Submit from the repository root:
#
#   slurm/launch.sh mlflow [SBATCH_OPTIONS...] [--] [STORE_DIR]          # default STORE_DIR runs/mlflow
#   slurm/launch.sh train --mlflow-server=STORE_DIR -- RECIPE.yaml ...     # starts one first if none answers
#
# Runs go to STORE_DIR/mlflow.db (made once, checked: onegen.mlflow_store), artifacts to
# STORE_DIR/mlartifacts. The server listens on this node's cluster-internal address, never 0.0.0.0 (it
# has no authentication), and writes its URI to STORE_DIR/server.uri once it answers /health; jobs
# submitted with --mlflow-server=STORE_DIR read it there. The file is removed when the server stops
# (scancel the job when the runs are done). A server already answering at STORE_DIR/server.uri is
# not started twice.
# Environment: MLFLOW_HOST (default: the first address of `hostname -I`), MLFLOW_PORT (default 15000 +
# job id % 5000), MLFLOW_START_TIMEOUT (s, default 300), ONEGEN_DRY_RUN=1 (print the command only).
#
#SBATCH --job-name=onegen-mlflow
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=2
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
set -euo pipefail

# SLURM runs a copy of this script from its spool dir: the checkout (and its slurm/common.sh, which
# does the rest of the start) is $ONEGEN_ROOT, else the directory sbatch was called from.
checkout="${ONEGEN_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}"
[ -f "$checkout/slurm/common.sh" ] || { echo "[slurm] error: $checkout is not an onegen checkout: submit from the repository root or set ONEGEN_ROOT" >&2; exit 2; }
# shellcheck source=slurm/common.sh
source "$checkout/slurm/common.sh"
onegen_job_start --no-mlflow-server

store="${1:-runs/mlflow}"
mkdir -p "$store"
store="$(cd "$store" && pwd)"
uri_file="$store/server.uri"
if [ -s "$uri_file" ] && onegen_mlflow_healthy "$(head -n1 "$uri_file")"; then
  onegen_log "an MLflow server already serves $store at $(head -n1 "$uri_file"): not starting another"
  exit 0
fi
host="$(onegen_internal_addr)"
port="${MLFLOW_PORT:-$((15000 + ${SLURM_JOB_ID:-0} % 5000))}"
uri="http://$host:$port"
db="sqlite:///$store/mlflow.db"
cmd=("$PYTHON" -m mlflow server --host "$host" --port "$port" --workers 1 --backend-store-uri "$db"
     --artifacts-destination "$store/mlartifacts")
onegen_log "mlflow server for $store at $uri: $(printf '%q ' "${cmd[@]}")"
if [ -n "${ONEGEN_DRY_RUN:-}" ]; then exit 0; fi

"$PYTHON" -c 'import sys; from onegen.mlflow_store import prepare_store; prepare_store(sys.argv[1])' "$db"
# Its own process group: `mlflow server` runs uvicorn as a child, and stopping the job stops both.
setsid "${cmd[@]}" &
pid=$!
# shellcheck disable=SC2064  # expand now: the paths and the pid are fixed
trap "rm -f '$uri_file'; kill -TERM -- -$pid 2>/dev/null || kill -TERM $pid 2>/dev/null || true" EXIT
trap 'exit 143' TERM INT
deadline=$((SECONDS + ${MLFLOW_START_TIMEOUT:-300}))
until onegen_mlflow_healthy "$uri"; do
  kill -0 "$pid" 2>/dev/null || onegen_die "the MLflow server exited before it answered at $uri"
  [ "$SECONDS" -lt "$deadline" ] || onegen_die "the MLflow server did not answer at $uri within ${MLFLOW_START_TIMEOUT:-300}s"
  sleep 1
done
echo "$uri" > "$uri_file.tmp.$$"
mv "$uri_file.tmp.$$" "$uri_file"
onegen_log "MLflow server up at $uri (URI in $uri_file); jobs started with --mlflow-server=$store log there"
rc=0
wait "$pid" || rc=$?
onegen_log "MLflow server stopped (exit $rc)"
exit "$rc"
