"""Gradient accumulation under real DeepSpeed ZeRO-3: ``grad_accum=2`` micro-batches of 4 rows give the
gradients and the logged losses of one micro-batch of the same 8 rows.

Each configuration runs in its own process (DeepSpeed and the HF ZeRO-3 context are process-global)
through the trainer's own set-up (``pipeline.train._set_up``) and step (``pipeline.step.accumulate``),
with plain SGD at lr 1 and no clipping, so one optimizer step moves every parameter by exactly minus its
(accumulated, ZeRO-reduced) gradient.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.train_fixtures import ROOT, SGD_ZERO3, TINY_MODEL, env, make_world

pytestmark = pytest.mark.slow

WORKER = """
import json, sys
import numpy as np
import deepspeed, torch
from onegen.config import load_config
from pipeline.config import TrainConfig
from pipeline.step import accumulate
from pipeline.train import _set_up

out, units, overrides = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3:]
cfg = load_config(TrainConfig, None, overrides)
run = _set_up(cfg)
params = [p for p in run.model.parameters()]
def snapshot():
    with deepspeed.zero.GatheredParameters(params):
        return [p.detach().double().clone().numpy() for p in params]
before = snapshot()
stats, tokens = accumulate(run.engine, lambda: run.wrapped.last_stats, [(0, 0, rows) for rows in units],
                           run.collate, run.wrapped.loss_cfg, run.engine.device)
after = snapshot()
np.savez(out + ".npz", *[a - b for a, b in zip(after, before)])
json.dump({"stats": stats, "tokens": tokens}, open(out + ".json", "w"))
run.tracker.end("FINISHED")
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("world"))


def _step(world, tmp_path, name: str, units: list[list[int]], mode: str, ret_loss: str):
    ds = tmp_path / "sgd_zero3.json"
    ds.write_text(json.dumps(SGD_ZERO3))
    micro = len(units[0])
    overrides = [f"data.train=[{world / 'rag_train'}]", f"output_dir={tmp_path / name}", "model.source=tiny",
                 "model.dtype=fp32", "model.attn_implementation=eager", *TINY_MODEL, f"loss.mode={mode}",
                 f"loss.ret_loss={ret_loss}", "loss.num_negatives=2", "optim.lr=1.0", "optim.warmup_steps=0",
                 "optim.weight_decay=0.0", f"optim.micro_batch_size={micro}", f"optim.grad_accum={len(units)}",
                 f"deepspeed={ds}", "export=false", "seed=3"]
    out = str(tmp_path / name)
    p = subprocess.run([sys.executable, "-c", WORKER, out, json.dumps(units), *overrides], cwd=ROOT, env=env(),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-5000:]
    deltas = np.load(out + ".npz")
    return [deltas[k] for k in sorted(deltas.files, key=lambda k: int(k.split("_")[1]))], json.loads(open(out + ".json").read())


@pytest.mark.parametrize("mode", ["onegen", "git"])
def test_grad_accum_equals_one_micro_batch_of_all_rows(world, tmp_path, mode):
    rows = list(range(8))
    split, split_out = _step(world, tmp_path, "accum2", [rows[:4], rows[4:]], mode, "bpr")
    whole, whole_out = _step(world, tmp_path, "accum1", [rows], mode, "bpr")
    moved = max(float(np.abs(w).max()) for w in whole)
    assert moved > 1e-3, "the step did not move the parameters: nothing is compared"
    worst = max(float(np.abs(a - b).max()) for a, b in zip(split, whole))
    assert worst <= 1e-5, f"accumulated gradients differ from one micro-batch of all rows by {worst:.2e}"
    for key in ("loss", "loss_gen", "loss_ret", "ret_acc", "n_gen", "n_ret"):
        assert split_out["stats"][key] == pytest.approx(whole_out["stats"][key], rel=1e-6, abs=1e-9), key
    assert split_out["tokens"] >= whole_out["tokens"]  # a doc two halves share is encoded by both
    if mode == "onegen":
        assert split_out["stats"]["n_ret"] > 0 and split_out["stats"]["loss_ret"] > 0
