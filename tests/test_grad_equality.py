"""compute_joint_loss: N data-parallel ranks give the gradients of one process on the global batch.

Two gloo processes each take half of a global batch (halves with different numbers of GEN tokens,
and a document held by both ranks), backpropagate ``compute_joint_loss(..., world_size=2)``, then
all-reduce and average the gradients exactly as DeepSpeed/DDP do. The result must equal the
gradients of one process on the concatenated batch with ``world_size=1``.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import transformers

from onegen.roles import CTX, GEN, RET
from pipeline.collator import CollatorConfig, OneGenCollator
from pipeline.config import LossConfig
from pipeline.forward import compute_joint_loss

PAD, EOS, RQ, RD, P_OPEN, P_CLOSE = 0, 1, 290, 291, 292, 293
RET_LOSSES = ("infonce", "bpr")


def tiny_llama(dtype: torch.dtype = torch.float64, attn: str = "eager") -> transformers.PreTrainedModel:
    torch.manual_seed(1234)
    cfg = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=300,
        max_position_embeddings=128,
    )
    cfg._attn_implementation = attn
    return transformers.LlamaForCausalLM(cfg).to(dtype)


def _doc(i: int) -> dict:
    n = 3 + (i * 5) % 7
    rng = np.random.default_rng(i)
    return {"doc_id": f"d{i}", "input_ids": rng.integers(10, 280, n).tolist() + [RD], "roles": [CTX] * n + [RET]}


DOCS = {f"d{i}": _doc(i) for i in range(16)}


def _query(example_id: str, seed: int, prompt: int, hops: list[tuple[str, list[str]]], answer: int) -> dict:
    rng = np.random.default_rng(seed)
    tok = lambda n: rng.integers(10, 280, n).tolist()  # noqa: E731
    ids, roles = tok(prompt), [CTX] * prompt
    for pos, _ in hops:
        body = DOCS[pos]["input_ids"][:-1]
        ids += tok(2) + [RQ, P_OPEN] + body + [P_CLOSE]
        roles += [GEN, GEN, RET, CTX] + [CTX] * len(body) + [CTX]
    ids += tok(answer) + [EOS]
    roles += [GEN] * (answer + 1)
    return {
        "example_id": example_id,
        "input_ids": ids,
        "roles": roles,
        "positives": [p for p, _ in hops],
        "negatives": [n for _, n in hops],
    }


# Rank 0 gets rows 0-1 (long answers), rank 1 rows 2-3 (short): different GEN counts. d2 is needed
# on both ranks (positive on rank 0, negative on rank 1), so the gathered candidates hold it twice.
ROWS = [
    _query("a", 1, 4, [("d0", ["d4", "d5", "d6"]), ("d1", ["d7", "d8"])], 12),
    _query("b", 2, 6, [("d2", ["d9", "d10"])], 9),
    _query("c", 3, 3, [("d3", ["d2", "d11", "d12"])], 2),
    _query("d", 4, 5, [("d13", ["d14", "d15", "d0"])], 1),
]
HALVES = (ROWS[:2], ROWS[2:])


def collate(rows: list[dict], mode: str = "onegen", **packing):
    """``packing``: CollatorConfig's packing fields (packing=True, pack_tokens=N)."""
    cfg = CollatorConfig(mode=mode, num_negatives=2, seed=5, pad_to_multiple_of=8, **packing)
    return OneGenCollator(lambda ids: [DOCS[i] for i in ids], PAD, cfg)(rows, epoch=1)


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def loss_grads(model: torch.nn.Module, batch, cfg: LossConfig) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Every parameter's gradient of ``compute_joint_loss`` on ``batch`` (one process), and its statistics."""
    model.zero_grad(set_to_none=True)
    loss, stats = compute_joint_loss(model, batch, cfg)
    loss.backward()
    return grads(model), stats


def run_step(model, rows, ret_loss, world_size=1):
    model.zero_grad(set_to_none=True)
    loss, stats = compute_joint_loss(model, collate(rows), LossConfig(ret_loss=ret_loss), world_size=world_size)
    loss.backward()
    return stats


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model = tiny_llama()
        result = {"n_gen_local": collate(HALVES[rank]).num_gen_targets()}
        for ret_loss in RET_LOSSES:
            stats = run_step(model, HALVES[rank], ret_loss, world_size=2)
            g = grads(model)
            for v in g.values():  # what DeepSpeed ZeRO / DDP do: sum over ranks, divide by world size
                dist.all_reduce(v)
                v /= 2
            result[ret_loss] = {"grads": g, "stats": stats}
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
        # Both ranks done before either tears gloo down: once in a full suite run rank 1 died with SIGABRT
        # ("terminate called without an active exception"), likely gloo's threads ended while the peer still talked.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def test_two_ranks_equal_one_process_on_global_batch(tmp_path: Path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert ranks[0]["n_gen_local"] != ranks[1]["n_gen_local"]  # what catches a wrong gen scaling

    model = tiny_llama()
    for ret_loss in RET_LOSSES:
        ref_stats = run_step(model, ROWS, ret_loss)
        ref = grads(model)
        assert ref_stats["n_ret"] == 5 and ref_stats["loss_ret"] > 0 and ref_stats["loss_gen"] > 0
        for r in range(2):
            got = ranks[r][ret_loss]
            assert set(got["grads"]) == set(ref)
            worst = max(rel_diff(got["grads"][n], ref[n]) for n in ref)
            assert worst <= 1e-4, (ret_loss, r, worst)
            for key in ("loss", "loss_gen", "loss_ret", "n_gen", "n_ret"):
                assert got["stats"][key] == pytest.approx(ref_stats[key], rel=1e-9), (ret_loss, key)


# ---------------------------------------------------------------------- single-process behaviour


class CountingCalls:
    """Records the input_ids shape of every forward of ``module``."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.shapes: list[tuple[int, ...]] = []
        module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.shapes.append(tuple((kwargs.get("input_ids") if "input_ids" in kwargs else args[0]).shape))


def test_modes_run_only_what_they_need():
    model = tiny_llama(torch.float32)
    head_calls: list[tuple[int, ...]] = []
    model.get_output_embeddings().register_forward_pre_hook(lambda m, a: head_calls.append(tuple(a[0].shape)))
    dec = CountingCalls(model.get_decoder())

    b = collate(ROWS, "git")
    loss, stats = compute_joint_loss(model, b, LossConfig(mode="git"))
    assert len(dec.shapes) == 1 and head_calls == [(b.num_gen_targets(), 64)]  # no doc forward
    assert stats["n_ret"] == 0 and stats["loss_ret"] == 0 and stats["loss"] == pytest.approx(stats["loss_gen"])
    loss.backward()

    dec.shapes.clear(), head_calls.clear()
    b = collate(ROWS, "rit")
    loss, stats = compute_joint_loss(model, b, LossConfig(mode="rit"))
    assert head_calls == [] and len(dec.shapes) == 2  # lm_head never runs; query + doc forwards
    assert stats["n_gen"] == 0 and stats["n_ret"] == 5 and stats["loss"] == pytest.approx(stats["loss_ret"])
    loss.backward()

    dec.shapes.clear(), head_calls.clear()
    b = collate(ROWS, "grit")
    loss, stats = compute_joint_loss(model, b, LossConfig(mode="grit", ret_loss="infonce"))
    assert dec.shapes[1] == tuple(b.doc_input_ids.shape) and 0 <= stats["ret_acc"] <= 1
    assert stats["loss"] == pytest.approx(stats["loss_gen"] + stats["loss_ret"], rel=1e-6)


def test_onegen_loss_matches_hand_assembled_reference():
    """λg·mean CE over GEN targets (full logits) + λr·mean BPR, with embeddings read by hand."""
    import torch.nn.functional as F

    model = tiny_llama()
    b = collate(ROWS)
    loss, stats = compute_joint_loss(model, b, LossConfig(lambda_gen=0.7, lambda_ret=1.9))
    logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    ce = F.cross_entropy(logits.flatten(0, 1), b.gen_targets.flatten(), ignore_index=-100)
    hq = model.model(input_ids=b.input_ids, attention_mask=b.attention_mask).last_hidden_state
    hd = model.model(input_ids=b.doc_input_ids, attention_mask=b.doc_attention_mask).last_hidden_state
    q = F.normalize(hq[b.q_ret_row, b.q_ret_pos], dim=-1)
    d = F.normalize(hd[torch.arange(b.num_docs), b.doc_ret_pos], dim=-1)
    terms = []
    for j in range(b.num_ret):
        s_pos = q[j] @ d[b.q_pos_doc[j]]
        negs = b.q_neg_doc[j][b.q_neg_mask[j]]
        terms.append(torch.stack([-F.logsigmoid(s_pos - q[j] @ d[k]) for k in negs]).mean())
    bpr = torch.stack(terms).mean()
    assert stats["loss_gen"] == pytest.approx(ce.item(), rel=1e-9)
    assert stats["loss_ret"] == pytest.approx(bpr.item(), rel=1e-9)
    assert loss.item() == pytest.approx(0.7 * ce.item() + 1.9 * bpr.item(), rel=1e-9)


def test_rank_without_retrieval_still_runs_a_doc_forward():
    # A rank whose rows have no RET token must run the same modules as the others (ZeRO-3 hooks).
    model = tiny_llama(torch.float32)
    dec = CountingCalls(model.get_decoder())
    no_ret = dict(ROWS[0], roles=[CTX if r == RET else r for r in ROWS[0]["roles"]], positives=[], negatives=[])
    b = collate([no_ret])
    assert b.num_docs == 0
    loss, stats = compute_joint_loss(model, b, LossConfig(ret_loss="infonce"))
    assert len(dec.shapes) == 2 and stats["n_ret"] == 0
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
