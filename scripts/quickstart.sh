#!/usr/bin/env bash
# The main job (README): set up .venv if needed, then synthetic world -> prep -> train OneGen
# (SmolLM2-135M-Instruct, a pretrained LM shipped offline, DeepSpeed ZeRO-3 on CPU) -> evaluate OneGen,
# two-pass, the BM25/MiniLM pipelines and no-retrieval with the same generator -> MLflow -> table and
# plots. Safe to rerun: a stage is reused only when its options are the same.
# Options: --preset tiny (the from-scratch CI run), --small, --out DIR, --steps N; see --help.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
t0=$(date +%s)
bash "$root/scripts/bootstrap.sh"
# the summary reports the wall time with and without this set-up
ONEGEN_SETUP_S="$(( $(date +%s) - t0 ))"
export ONEGEN_SETUP_S
# shellcheck source=scripts/env.sh
source "$root/scripts/env.sh"
cd "$root"
exec "$root/.venv/bin/python" -m onegen.quickstart "$@"
