#!/usr/bin/env bash
# The main job (README): set up .venv if needed, then synthetic world -> prep -> train OneGen and
# the git baseline with DeepSpeed ZeRO-3 on 2 CPU ranks -> evaluate OneGen, two-pass, pipeline and
# no-retrieval -> MLflow -> comparison table and plots. Safe to rerun: finished stages are reused.
# Options: --small (reduced, minutes), --preset smollm2, --out DIR; see --help.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
# shellcheck source=scripts/env.sh
source "$root/scripts/env.sh"
cd "$root"
exec "$root/.venv/bin/python" -m onegen.quickstart "$@"
