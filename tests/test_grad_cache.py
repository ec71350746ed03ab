"""Gradient caching (``loss.grad_cache``) gives the gradients of the plain step.

In one process (the algorithm, on the plain torch model with a minimal stand-in for the engine's
forward/backward/step calls), and under real DeepSpeed ZeRO-3 on 2 gloo ranks through the trainer's own
set-up and step: BPR and InfoNCE, onegen and rit, grad_accum 1 and 2, chunks smaller than a rank's rows
(and ranks with different numbers of documents, so padding chunks run).
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import replace

import numpy as np
import pytest
import torch

from onegen.hidden import decoder_of, last_hidden
from onegen.stages import torchrun
from pipeline.config import LossConfig
from pipeline.forward import loss_counts
from pipeline.grad_cache import _encode, cached_micro_batch, plan_chunks, replay_loss
from pipeline.wrapper import OneGenTrainModule
from tests.test_grad_equality import ROWS, collate, grads, loss_grads, rel_diff, tiny_llama
from tests.train_fixtures import ROOT, SGD_ZERO3, TINY_MODEL, env, make_world


class TorchEngine:
    """The calls ``cached_micro_batch`` makes on a DeepSpeed engine, on a plain module (one process)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor, scale_wrt_gas: bool = True) -> None:
        loss.backward()

    def step(self) -> None:
        pass

    def set_gradient_accumulation_boundary(self, is_boundary: bool) -> None:
        pass


def _cached(model, batch, cfg):
    model.zero_grad(set_to_none=True)
    engine = TorchEngine(OneGenTrainModule(model, cfg, 1))
    stats = cached_micro_batch(engine, batch, cfg, tuple(float(c) for c in loss_counts(batch, cfg)), 1, True,
                               torch.device("cpu"))
    return grads(model), stats


@pytest.mark.parametrize("mode", ["onegen", "rit", "grit"])
@pytest.mark.parametrize("ret_loss", ["bpr", "infonce"])
@pytest.mark.parametrize("chunk", [1, 3])
def test_cached_gradients_equal_plain_ones_in_one_process(mode, ret_loss, chunk):
    model = tiny_llama()
    cfg = LossConfig(mode=mode, ret_loss=ret_loss, lambda_gen=0.7, lambda_ret=1.3, grad_cache=True, grad_cache_chunk=chunk)
    batch = collate(ROWS, mode)
    ref, ref_stats = loss_grads(model, batch, replace(cfg, grad_cache=False))
    got, stats = _cached(model, batch, cfg)
    assert set(got) == set(ref)
    worst = max(rel_diff(got[n], ref[n]) for n in ref)
    assert worst <= 1e-9, worst  # fp64: the same sums in another order
    for key in ("loss", "loss_gen", "loss_ret", "ret_acc", "n_gen", "n_ret"):
        assert stats[key] == pytest.approx(ref_stats[key], rel=1e-9, abs=1e-12), key


def test_a_chunk_re_run_draws_the_same_dropout_as_its_encoding():
    """The cached vectors are the ones the re-run back-propagates through, dropout included."""
    torch.manual_seed(0)
    model = tiny_llama(torch.float32)
    model.config.attention_dropout = 0.5
    for layer in decoder_of(model).layers:
        layer.self_attn.attention_dropout = 0.5
    model.train()
    cfg = LossConfig(grad_cache=True, grad_cache_chunk=2)
    batch = collate(ROWS)
    queries, _ = plan_chunks(batch, cfg, torch.device("cpu"))
    cached = _encode(model, queries, batch.num_ret)
    decoder = decoder_of(model)
    with torch.no_grad():
        again = [last_hidden(decoder, c.input_ids, c.attention_mask)[c.ret_rows, c.ret_pos] for c, _ in queries]
    for (chunk, take), other in zip(queries, again):
        assert not torch.equal(other, cached[take]), "dropout is off: this test checks nothing"
    for chunk, take in queries:
        chunk.ret_grad = torch.zeros_like(cached[take])
        captured: list[torch.Tensor] = []
        hook = decoder.register_forward_hook(lambda m, a, out: captured.append(out.last_hidden_state))
        with torch.no_grad():
            replay_loss(model, [chunk], cfg, 1, 1.0)  # restores the RNG state the chunk was encoded from
        hook.remove()
        assert torch.equal(captured[0][chunk.ret_rows, chunk.ret_pos], cached[take])


# ------------------------------------------------------------------ 2 ranks, real DeepSpeed ZeRO-3

# Every configuration in one launch: the gradients are read before the optimizer would step
# (deepspeed.utils.safe_get_full_grad), then cleared, so each starts from the same weights.
WORKER = """
import json, sys
import deepspeed, torch
from deepspeed.utils import safe_get_full_grad
from onegen.config import load_config
from pipeline.collator import CollatorConfig, OneGenCollator
from pipeline.config import LossConfig, TrainConfig
from pipeline.step import accumulate
from pipeline.train import _set_up

out, overrides = sys.argv[1], sys.argv[2:]
run = _set_up(load_config(TrainConfig, None, overrides))
engine = run.engine
engine.step = lambda: None  # keep the weights: only the gradients are compared
rank = torch.distributed.get_rank()
units = {1: [[0, 1, 2, 3] if rank == 0 else [4, 5, 6]], 2: [[0, 1, 2], [3, 4, 5, 6, 7]] if rank == 0 else [[8, 9], [10, 11, 12]]}
results = {}
for mode in ("onegen", "rit"):
    run.collators = [OneGenCollator(d.doc_rows, run.tokenizer.pad_token_id, CollatorConfig(mode=mode, num_negatives=2, seed=3))
                     for d in run.train_sets]
    for ret_loss in ("bpr", "infonce"):
        for accum in (1, 2):
            for cache in (False, True):
                cfg = LossConfig(mode=mode, ret_loss=ret_loss, temperature=0.1, grad_cache=cache, grad_cache_chunk=1)
                run.wrapped.loss_cfg = cfg
                stats, _ = accumulate(engine, lambda: run.wrapped.last_stats, [(0, 0, u) for u in units[accum]],
                                      run.collate, cfg, engine.device)
                g = [safe_get_full_grad(p) for p in run.model.parameters()]
                engine.optimizer.zero_grad()
                if rank == 0:
                    results[f"{mode}-{ret_loss}-{accum}-{int(cache)}"] = {
                        "grads": [x.double().flatten().tolist() for x in g], "stats": stats}
if rank == 0:
    json.dump(results, open(out, "w"))
run.tracker.end("FINISHED")
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("world"))


@pytest.mark.slow
def test_cached_gradients_equal_plain_ones_on_two_zero3_ranks(world, tmp_path):
    ds = tmp_path / "sgd_zero3.json"
    ds.write_text(json.dumps(SGD_ZERO3))
    out = tmp_path / "grads.json"
    overrides = [f"data.train=[{world / 'rag_train'}]", f"output_dir={tmp_path / 'run'}", "model.source=tiny",
                 "model.dtype=fp32", "model.attn_implementation=eager", *TINY_MODEL, "optim.lr=1.0",
                 "optim.warmup_steps=0", "optim.weight_decay=0.0", "optim.micro_batch_size=4", "optim.grad_accum=1",
                 f"deepspeed={ds}", "export=false", "seed=3"]
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    p = subprocess.run([*torchrun(2), str(script), str(out), *overrides], cwd=ROOT, env=env(), capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-6000:]
    results = json.loads(out.read_text())
    assert len(results) == 16
    for key in [k for k in results if k.endswith("-0")]:
        plain, cached = results[key], results[key[:-1] + "1"]
        ref = [np.asarray(g) for g in plain["grads"]]
        got = [np.asarray(g) for g in cached["grads"]]
        assert max(float(np.abs(r).max()) for r in ref) > 1e-6, f"{key}: no gradient: nothing is compared"
        worst = max(float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)) for a, b in zip(got, ref))
        assert worst <= 1e-4, f"{key}: cached gradients differ from the plain ones by {worst:.2e} (relative)"
        for stat in ("loss", "loss_gen", "loss_ret", "n_gen", "n_ret", "ret_acc"):
            assert cached["stats"][stat] == pytest.approx(plain["stats"][stat], rel=1e-5, abs=1e-9), (key, stat)
        assert plain["stats"]["n_ret"] > 0 and plain["stats"]["loss_ret"] > 0, key
