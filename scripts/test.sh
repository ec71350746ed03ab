#!/usr/bin/env bash
# The test command of the README (and of .ci/run): set up .venv if needed, then run every test,
# the slow end-to-end ones included. Extra arguments go to pytest (e.g. -m "not slow", -k prep).
# pytest exits 5 when it collected no test: that is a failure here, never a silent pass.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
# shellcheck source=scripts/env.sh
source "$root/scripts/env.sh"
cd "$root"
exec "$root/.venv/bin/python" -m pytest "$@"
