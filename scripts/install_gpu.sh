#!/usr/bin/env bash
# GPU install of onegen into a virtual environment (docs/gpu.md). Run it on a machine with an NVIDIA
# driver and, for the flash-attn build and DeepSpeed's fused Adam, the CUDA toolkit (nvcc) of the
# same major version as torch's CUDA build (e.g. `module load cuda/12.8` on a cluster):
#
#   bash scripts/install_gpu.sh                      # .venv, torch from the cu128 index
#   TORCH_CUDA=cu126 bash scripts/install_gpu.sh     # another CUDA 12 build of torch 2.13.0
#   ONEGEN_VENV=/scratch/envs/onegen bash scripts/install_gpu.sh
#   ONEGEN_VENV=none bash scripts/install_gpu.sh     # into the python on PATH (a conda env, a container)
#   ONEGEN_NO_FLASH=1 bash scripts/install_gpu.sh    # skip flash-attn (training then uses sdpa)
#
# The order matters, and is why this is a script and not one `pip install -e ".[gpu,flash]"`:
#   1. torch==2.13.0 from the CUDA index (the version the CPU install pins; --index-url so pip cannot
#      take another build of it), before anything that depends on torch;
#   2. pip install -e ".[gpu,dev]": onegen, DeepSpeed, transformers, ..., faiss-gpu (CUDA 12 wheel),
#      and pytest (the GPU tests and bench/gpu_smoke.sh run them);
#   3. pip install flash-attn --no-build-isolation: flash-attn's setup.py imports torch and builds
#      against *this* torch (an isolated build has no torch; a wheel for another torch/CUDA fails at
#      import with an undefined symbol). It downloads a matching prebuilt wheel when one exists,
#      else compiles (MAX_JOBS parallel nvcc jobs; tens of minutes, several GB of RAM per job);
#   4. a check that imports everything and prints the stack (bench/gpu_smoke.py stack): it exits
#      non-zero when CUDA is not visible or flash-attn does not load, which is what training would
#      otherwise stop on (onegen/devices.py refuses a broken flash-attn instead of falling back).
#
# Environment: ONEGEN_VENV (default .venv in the checkout; "none": no venv), PYTHON (the interpreter
# that creates the venv, default python3), TORCH_CUDA (default cu128), TORCH_INDEX_URL (default
# https://download.pytorch.org/whl/$TORCH_CUDA), FLASH_ATTN_SPEC (default "flash-attn>=2.6"),
# MAX_JOBS (default: CPUs / 2, at most 8), ONEGEN_NO_FLASH=1, ONEGEN_SKIP_CHECK=1 (no GPU here).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${ONEGEN_VENV:-$root/.venv}"
torch_cuda="${TORCH_CUDA:-cu128}"
index_url="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/$torch_cuda}"
flash_spec="${FLASH_ATTN_SPEC:-flash-attn>=2.6}"
say() { echo "[install_gpu] $*"; }

if [ "$venv" = none ]; then
  py="${PYTHON:-python3}"
else
  if [ ! -x "$venv/bin/python" ]; then
    say "creating virtual environment $venv"
    "${PYTHON:-python3}" -m venv "$venv"
  fi
  py="$venv/bin/python"
fi
say "python: $("$py" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
if command -v nvidia-smi >/dev/null 2>&1; then
  say "driver: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -n1)"
else
  say "warning: nvidia-smi not found: install on a GPU node (the build of step 3 does not need a GPU, the check does)"
fi
if command -v nvcc >/dev/null 2>&1; then
  say "nvcc: $(nvcc --version | grep -o 'release [0-9.]*' || true)"
else
  say "warning: nvcc not found (no CUDA toolkit on PATH): flash-attn can only install from a prebuilt wheel," \
    "and DeepSpeed cannot JIT-build its fused Adam; load one (module load cuda) or set CUDA_HOME"
fi

"$py" -m pip install --upgrade pip
say "1/4 torch 2.13.0 ($torch_cuda) from $index_url"
"$py" -m pip install "torch==2.13.0" --index-url "$index_url"
cuda="$("$py" -c 'import torch; print(torch.version.cuda or "")')"
[ -n "$cuda" ] || { say "error: the torch installed is a CPU build; check TORCH_CUDA / TORCH_INDEX_URL"; exit 1; }
say "torch $("$py" -c 'import torch; print(torch.__version__)') built for CUDA $cuda"

say "2/4 onegen with the gpu and dev extras (faiss-gpu, DeepSpeed, transformers, ..., pytest)"
# torch==2.13.0 is already satisfied (the +cuXXX local version matches), so this keeps that build.
"$py" -m pip install -e "${root}[gpu,dev]"
# The CPU wheel of faiss would shadow the GPU one (both are the `faiss` module).
if "$py" -m pip show faiss-cpu >/dev/null 2>&1; then
  say "removing faiss-cpu (faiss-gpu provides the same module)"
  "$py" -m pip uninstall -y faiss-cpu
  "$py" -m pip install --force-reinstall --no-deps "faiss-gpu>=1.14.3"
fi

if [ -n "${ONEGEN_NO_FLASH:-}" ]; then
  say "3/4 flash-attn skipped (ONEGEN_NO_FLASH): attention will be sdpa"
else
  say "3/4 $flash_spec, built against this torch (--no-build-isolation)"
  "$py" -m pip install ninja packaging psutil wheel setuptools einops
  cpus="$(nproc 2>/dev/null || echo 4)"
  jobs=$(( cpus / 2 > 8 ? 8 : (cpus / 2 > 0 ? cpus / 2 : 1) ))
  MAX_JOBS="${MAX_JOBS:-$jobs}" "$py" -m pip install "$flash_spec" --no-build-isolation
fi

if [ -n "${ONEGEN_SKIP_CHECK:-}" ]; then
  say "4/4 check skipped (ONEGEN_SKIP_CHECK); run on a GPU node: $py $root/bench/gpu_smoke.py stack"
  exit 0
fi
say "4/4 check"
args=(stack --require-cuda)
if [ -z "${ONEGEN_NO_FLASH:-}" ]; then args+=(--require-flash); fi
cd "$root"
"$py" bench/gpu_smoke.py "${args[@]}"
say "done: now run the smoke test (bash bench/gpu_smoke.sh, about 5 minutes on one GPU)"
