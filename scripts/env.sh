#!/usr/bin/env bash
# Environment shared by every onegen entry script: offline hubs, quiet telemetry, caches inside the
# checkout (DeepSpeed JIT-builds a comm op once, ~22 s; keep it out of $HOME so CI reuses it).
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export TRANSFORMERS_OFFLINE="${TRANSFORMERS_OFFLINE:-1}"
export HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}"
export MLFLOW_DISABLE_TELEMETRY=true
export DO_NOT_TRACK=1
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$root/.cache/torch_extensions}"
export HF_HOME="${HF_HOME:-$root/.cache/huggingface}"
export TOKENIZERS_PARALLELISM=false
mkdir -p "$TORCH_EXTENSIONS_DIR" "$HF_HOME"
