#!/usr/bin/env bash
# The real-benchmark job (README): set up .venv if needed, then prepare the real HotpotQA / 2Wiki / entity-linking
# samples (split by question id), train OneGen on the training parts, evaluate OneGen, two-pass, the BM25/MiniLM
# pipelines and no-retrieval (one shared generator) on the held-out parts, and write the table, plot and MLflow
# experiment. Safe to rerun: a stage is reused only when its options are the same. See --help.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
# shellcheck source=scripts/env.sh
source "$root/scripts/env.sh"
cd "$root"
exec "$root/.venv/bin/python" -m onegen.benchmark "$@"
