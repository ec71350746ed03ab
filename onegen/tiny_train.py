"""The trainer (pipeline/train.py) on one prepared dataset with the tiny-cpu recipe and the smallest
model, as one process or under a launcher: the runs the tests and bench/train_step.py start."""

from __future__ import annotations

import sys
from pathlib import Path

from onegen.stages import ROOT, torchrun

# The smallest model (later ``model.*`` overrides win: bench/train_step.py's --model sets all four).
TINY_MODEL = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=1", "model.num_heads=2"]


def train_cmd(launcher: str, data: Path, out: Path, *overrides: str) -> list[str]:
    """The trainer on ``data`` (no eval) writing ``out``: one process ("python"), or two ranks ("torchrun",
    "deepspeed")."""
    args = ["--config", str(ROOT / "configs" / "tiny-cpu.yaml"), f"data.train=[{data}]", "data.eval=[]",
            f"output_dir={out}", *TINY_MODEL, *overrides]
    script = str(ROOT / "pipeline" / "train.py")
    if launcher == "python":
        return [sys.executable, script, *args]
    if launcher == "torchrun":
        return [*torchrun(2), script, *args]
    if launcher == "deepspeed":
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", script, *args]
    raise ValueError(launcher)
