"""A small synthetic world prepared once per test session, and helpers to run the trainer for real."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from onegen import tiny_train
from onegen.tiny_train import TINY_MODEL  # noqa: F401  (the tests' model overrides)

ROOT = Path(__file__).resolve().parent.parent

# Plain SGD at lr "auto" (the tests give 1.0), no momentum, no clipping, ZeRO-3: one optimizer step moves
# every parameter by exactly minus its (accumulated, ZeRO-reduced) gradient.
SGD_ZERO3 = {
    "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
    "gradient_clipping": 0.0, "steps_per_print": 1000000, "bf16": {"enabled": "auto"}, "zero_allow_untested_optimizer": True,
    "optimizer": {"type": "SGD", "params": {"lr": "auto", "momentum": 0.0, "weight_decay": "auto"}},
    "zero_optimization": {"stage": 3, "overlap_comm": "auto", "contiguous_gradients": True,
                          "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                          "stage3_param_persistence_threshold": "auto"},
}


def make_world(out: Path, questions: int = 120) -> Path:
    from data_prep.world import WorldPrepConfig, prepare_world
    from onegen.config import load_config

    cfg = load_config(WorldPrepConfig, None, [
        f"out={out}", f"world.n_train_questions={questions}", "world.n_dev_questions=20",
        "world.n_train_el=60", "world.n_dev_el=10", "world.n_train_entities=120", "world.n_dev_entities=40",
        "tokenizer=bpe:600",
    ])
    prepare_world(cfg, log=lambda *a: None)
    return out


def env() -> dict:
    e = dict(os.environ)
    e.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MLFLOW_DISABLE_TELEMETRY="true", TOKENIZERS_PARALLELISM="false",
             TORCH_EXTENSIONS_DIR=str(ROOT / ".cache" / "torch_extensions"), PYTHONUNBUFFERED="1")
    # A launcher's variables or a tracking URI left by another test (mlflow.set_tracking_uri exports
    # MLFLOW_TRACKING_URI) must not leak into the runs a test starts.
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE", "MLFLOW_TRACKING_URI"):
        e.pop(k, None)
    return e


def user_env() -> dict:
    """``env()`` without the offline variables scripts/env.sh exports: a user's shell, where the entry points
    must set them themselves."""
    return {k: v for k, v in env().items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")}


def quickstart_small_cmd(out: Path) -> list[str]:
    """The reduced quickstart (``--preset tiny --small``) into ``out``."""
    return [sys.executable, "-m", "onegen.quickstart", "--preset", "tiny", "--small", "--out", str(out)]


def train_cmd(launcher: str, world: Path, out: Path, *overrides: str) -> list[str]:
    """The trainer on ``world``'s RAG training set (onegen.tiny_train: the tiny-cpu recipe, the smallest model)."""
    return tiny_train.train_cmd(launcher, world / "rag_train", out, *overrides)


def run(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise AssertionError(f"command failed ({p.returncode}): {' '.join(cmd)}\n--- stdout\n{p.stdout[-4000:]}\n--- stderr\n{p.stderr[-6000:]}")
    return p
