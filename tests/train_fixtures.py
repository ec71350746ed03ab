"""A small synthetic world prepared once per test session, and helpers to run the trainer for real."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

TINY_MODEL = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=1", "model.num_heads=2"]


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


def train_cmd(launcher: str, world: Path, out: Path, *overrides: str) -> list[str]:
    args = ["--config", str(ROOT / "configs" / "tiny-cpu.yaml"), f"data.train=[{world / 'rag_train'}]", "data.eval=[]",
            f"output_dir={out}", *TINY_MODEL, *overrides]
    script = str(ROOT / "pipeline" / "train.py")
    if launcher == "python":
        return [sys.executable, script, *args]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script, *args]
    if launcher == "deepspeed":
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", script, *args]
    raise ValueError(launcher)


def run(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise AssertionError(f"command failed ({p.returncode}): {' '.join(cmd)}\n--- stdout\n{p.stdout[-4000:]}\n--- stderr\n{p.stderr[-6000:]}")
    return p
