#!/usr/bin/env bash
# GPU smoke test: one script, one GPU, about 5 minutes, no network and no model hub.
#
#   bash bench/gpu_smoke.sh                 # from anywhere; ends with "[smoke] PASS" or "[smoke] FAIL ..."
#   SMOKE_DIR=/scratch/smoke SMOKE_KEEP=1 bash bench/gpu_smoke.sh
#
# Needs: an NVIDIA GPU with bf16 (Ampere or newer) and ~35 GB of memory for step 4, ~25 GB of free disk
# in SMOKE_DIR (the run's final ZeRO checkpoint, deleted at the end), torch with CUDA,
# deepspeed, transformers, accelerate, datasets, faiss (faiss-gpu for the GPU index test), pytest and
# pytest-timeout, the CUDA toolkit (nvcc: DeepSpeed JIT-builds its fused Adam once, ~1 min); flash-attn
# is optional (without it attention is sdpa and the flash tests skip; SMOKE_REQUIRE_FLASH=1 makes that
# a failure). `bash scripts/install_gpu.sh` installs all of it (docs/gpu.md). Python: .venv of the
# checkout when it exists, else python3 on PATH (e.g. a container with torch preinstalled), or $PYTHON.
#
# Steps:
#   1. the stack: python, torch + CUDA, GPU name and memory, flash-attn (version, or why it cannot run),
#      faiss (version, GPUs), DeepSpeed, transformers;
#   2. pytest -m gpu tests/test_gpu.py (flash vs sdpa states, batched decoding under flash, ZeRO-3 bf16
#      train -> resume -> export, faiss-gpu vs CPU);
#   3. a small synthetic world (python -m data_prep world);
#   4. SMOKE_STEPS (8) bf16 ZeRO-3 steps of a model of Qwen2-1.5B's shape built from a config (random
#      weights, 1.54B parameters), attention auto (flash-attn when it loads), gradient checkpointing,
#      through the real trainer (pipeline/train.py);
#   5. its tokens/s, step time and peak memory (the first 2 steps are warm-up) and the MFU;
#   6. the same steps with data.packing=true (varlen flash-attn): tokens/s, step time, memory and padding
#      against step 4 (the varlen gain);
#   7. 3 steps of the same model with LoRA (model.lora) and gradient caching (loss.grad_cache).
#
# Environment: PYTHON, SMOKE_DIR (default a new temporary dir), SMOKE_KEEP=1 (keep the 1.5B
# checkpoint, ~20 GB with its optimizer state; by default it is deleted), SMOKE_STEPS (8), SMOKE_MICRO_BATCH (8),
# SMOKE_SKIP_TESTS=1, SMOKE_REQUIRE_FLASH=1, SMOKE_TEST_TIMEOUT (420 s), SMOKE_TRAIN_TIMEOUT (600 s).
set -uo pipefail  # not -e: every step runs and reports; the last line says PASS or FAIL
export PYTHONUNBUFFERED=1
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root" || exit 2
# shellcheck source=scripts/env.sh
source "$root/scripts/env.sh"  # offline hub, telemetry off, caches in .cache/ of the checkout

if [ -n "${PYTHON:-}" ]; then
  py="$PYTHON"
elif [ -x "$root/.venv/bin/python" ]; then
  py="$root/.venv/bin/python"
else
  py="$(command -v python3 || echo python3)"
fi
work="${SMOKE_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/onegen-gpu-smoke.XXXXXX")}"
mkdir -p "$work"
steps="${SMOKE_STEPS:-8}"
failed=()
t_start=$SECONDS
say() { echo "[smoke] $*"; }

# step NAME TIMEOUT_S CMD...: run one step, its output to the terminal and to $work/NAME.log.
step() {
  local name="$1" limit="$2" rc t0=$SECONDS
  shift 2
  say "---- $name ($(printf '%q ' "$@"))"
  timeout --kill-after=30 "$limit" "$@" 2>&1 | tee "$work/$name.log"
  rc=${PIPESTATUS[0]}
  if [ "$rc" -eq 0 ]; then
    say "---- $name: ok ($((SECONDS - t0)) s)"
  else
    [ "$rc" -eq 124 ] && say "---- $name: timed out after $limit s"
    say "---- $name: FAILED (exit $rc, $((SECONDS - t0)) s; log $work/$name.log)"
    failed+=("$name")
  fi
  return "$rc"
}

say "python $py · work dir $work"

# 1. The stack (fails only when torch sees no CUDA; flash-attn is reported, required on request).
stack_args=(stack --require-cuda)
if [ -n "${SMOKE_REQUIRE_FLASH:-}" ]; then stack_args+=(--require-flash); fi
if ! step stack 300 "$py" bench/gpu_smoke.py "${stack_args[@]}"; then
  say "FAIL: no usable CUDA stack (see above); nothing else can run"
  exit 1
fi

# 2. The GPU tests.
if [ -n "${SMOKE_SKIP_TESTS:-}" ]; then
  say "---- gpu tests skipped (SMOKE_SKIP_TESTS)"
else
  step gpu-tests "${SMOKE_TEST_TIMEOUT:-420}" "$py" -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider \
    --basetemp="$work/pytest" || true
fi

# 3. A small world: 160 train questions, 300 entities, a 2000-token BPE (seconds on one CPU).
world="$work/world"
if step world 300 "$py" -m data_prep world --out "$world" --train-questions 160 --dev-questions 10 \
    --tokenizer bpe:2000 world.n_train_entities=300 world.n_dev_entities=60 world.n_train_el=20 world.n_dev_el=10; then
  # 4. Qwen2-1.5B's shape (vocab 151936 pads the small tokenizer's embedding as Qwen2's does).
  out="$work/train"
  train_args=(--config configs/tiny-cpu.yaml "data.train=[$world/rag_train]" "data.eval=[]" "output_dir=$out"
    model.architecture=qwen2 model.hidden_size=1536 model.intermediate_size=8960 model.num_layers=28
    model.num_heads=12 model.num_key_value_heads=2 model.vocab_size=151936 model.max_position_embeddings=2048
    model.dtype=bf16 model.attn_implementation=auto model.tie_word_embeddings=true model.gradient_checkpointing=true
    "optim.max_steps=$steps" "optim.micro_batch_size=${SMOKE_MICRO_BATCH:-8}" optim.lr=2e-5 optim.warmup_steps=0
    checkpoint_every=0 eval_every=0 export=false)
  if step train "${SMOKE_TRAIN_TIMEOUT:-600}" "$py" pipeline/train.py "${train_args[@]}"; then
    # 5. Throughput and MFU (parameters from the resolved config.yaml of the run).
    report_args=(report --out "$out" --skip 2 --log "$work/train.log")
    if [ -n "${SMOKE_REQUIRE_FLASH:-}" ]; then report_args+=(--require-flash); fi
    step report 120 "$py" bench/gpu_smoke.py "${report_args[@]}" || true
    # 6. The same steps packed (data.packing: flash-attn's varlen path when it loads): the padding saved.
    if step train-packed "${SMOKE_TRAIN_TIMEOUT:-600}" "$py" pipeline/train.py "${train_args[@]}" \
        "output_dir=$out-packed" data.packing=true; then
      step packed-vs-padded 120 "$py" bench/gpu_smoke.py compare --base "$out" --other "$out-packed" --label packed || true
    fi
    rm -rf "$out-packed/checkpoints"
  fi
  # 7. LoRA with gradient caching, 3 bf16 steps of the same shape: both paths run on the GPU.
  if step train-lora-gradcache "${SMOKE_TRAIN_TIMEOUT:-600}" "$py" pipeline/train.py "${train_args[@]}" \
      "output_dir=$out-lora" optim.max_steps=3 model.lora.enabled=true loss.grad_cache=true loss.grad_cache_chunk=2; then
    step lora-report 120 "$py" bench/gpu_smoke.py report --out "$out-lora" --skip 1 || true
  fi
  rm -rf "$out-lora/checkpoints"
  if [ -z "${SMOKE_KEEP:-}" ]; then
    rm -rf "$out/checkpoints"  # the 1.5B ZeRO checkpoint with optimizer state: ~20 GB
  fi
fi

elapsed=$((SECONDS - t_start))
if [ ${#failed[@]} -eq 0 ]; then
  say "PASS ($elapsed s; logs in $work)"
  exit 0
fi
say "FAIL: ${failed[*]} ($elapsed s; logs in $work)"
exit 1
