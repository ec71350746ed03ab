"""Gradient caching for the retrieval loss (``loss.grad_cache``): peak memory follows a chunk of rows, not
the contrastive batch, and the gradients equal those of the plain step.

The retrieval loss depends on the model only through the RET states of the query rows and of the
documents. So, for each micro-batch:

1. **Encode without a graph**, ``grad_cache_chunk`` rows at a time: the raw RET states (at least fp32) of every
   query row and document, and the RNG state each chunk started from (dropout draws the same again).
2. **Loss on the vectors**: ``pipeline.forward.retrieval_from_vectors`` over the cached vectors, the
   documents all-gathered across ranks exactly as the plain step does; its backward gives the loss's
   gradient with respect to each cached vector, the other ranks' contributions summed into the rank that
   owns the vector (the differentiable all-gather's backward).
3. **Re-run each chunk with a graph** and back-propagate ``<RET states, cached gradient>`` (a surrogate
   whose gradient is the chain rule's) plus, for query rows, the generation loss of the chunk.

Each re-run chunk is its own engine forward and backward (a DeepSpeed micro-step): ZeRO-3 reduces a
parameter's gradient once per backward and, within the first micro-step, copies rather than adds, so
several chunks inside one backward would overwrite each other's gradients (the failure of GradCache
under ZeRO-3 in other trainers); a micro-step re-runs one query chunk and one document chunk. The
optimizer steps after the last micro-step of the optimizer step only
(``engine.set_gradient_accumulation_boundary``). Every rank runs the same number of chunk forwards
(padding with one-token chunks): ZeRO-3 gathers parameters in collective module hooks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

import onegen.distributed as collectives
from onegen.hidden import decoder_of, last_hidden
from onegen.roles import IGNORE_INDEX
from pipeline.collator import Batch
from pipeline.config import LossConfig
from pipeline.forward import doc_rows, global_sums, retrieval_from_vectors, summarize
from pipeline.loss import gen_loss_sum, upcast


@dataclass
class Chunk:
    """Rows of one micro-batch re-run together, and the RET states among them whose gradient is cached."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor | None
    gen_targets: torch.Tensor | None  # query chunks of a mode with generation; None for documents
    ret_rows: torch.Tensor  # [n] row within the chunk of each cached vector
    ret_pos: torch.Tensor  # [n]
    rng: tuple[torch.Tensor, list[torch.Tensor] | None] | None = None  # the RNG state the chunk starts from
    ret_grad: torch.Tensor | None = None  # [n, H] d loss / d vector, from step 2


def _rng_state() -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    return torch.get_rng_state(), (torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def _set_rng(state: tuple[torch.Tensor, list[torch.Tensor] | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def _slice(t: torch.Tensor | None, lo: int, hi: int) -> torch.Tensor | None:
    return None if t is None else t[lo:hi]


def _chunks(ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor | None, targets: torch.Tensor | None,
            vec_rows: torch.Tensor, vec_pos: torch.Tensor, size: int, n_chunks: int,
            filler: torch.Tensor) -> list[tuple[Chunk, torch.Tensor]]:
    """``n_chunks`` chunks of ``size`` rows (the one token ``filler`` past the last row), each with the
    indices of the vectors (rows ``vec_rows``, positions ``vec_pos``) that fall in it."""
    out = []
    for c in range(n_chunks):
        lo, hi = c * size, min((c + 1) * size, ids.shape[0])
        if lo >= hi:  # a padding chunk: the same modules run, nothing is learnt from it
            none = vec_rows.new_zeros(0)
            chunk = Chunk(filler, torch.ones_like(filler), None if pos is None else torch.zeros_like(filler),
                          None if targets is None else torch.full_like(filler, IGNORE_INDEX), none, none)
            out.append((chunk, none))
            continue
        take = ((vec_rows >= lo) & (vec_rows < hi)).nonzero().flatten()
        chunk = Chunk(ids[lo:hi], mask[lo:hi], _slice(pos, lo, hi), _slice(targets, lo, hi),
                      vec_rows[take] - lo, vec_pos[take])
        out.append((chunk, take))
    return out


def plan_chunks(batch: Batch, cfg: LossConfig, device: torch.device) -> tuple[list, list]:
    """(query chunks, doc chunks), each a list of (Chunk, vector indices), as many on every rank."""
    size = cfg.grad_cache_chunk
    n_doc_rows = batch.doc_input_ids.shape[0] if batch.num_docs else 0
    local = torch.tensor([math.ceil(batch.input_ids.shape[0] / size), math.ceil(n_doc_rows / size)],
                         dtype=torch.long, device=device)
    n_q, n_d = collectives.all_reduce_(local, op=dist.ReduceOp.MAX).tolist()  # one process: unchanged
    targets = batch.gen_targets if cfg.uses_gen else None
    filler = batch.input_ids[:1, :1]
    queries = _chunks(batch.input_ids, batch.attention_mask, batch.position_ids, targets,
                      batch.q_ret_row, batch.q_ret_pos, size, n_q, filler)
    docs = _chunks(batch.doc_input_ids, batch.doc_attention_mask, batch.doc_position_ids, None,
                   doc_rows(batch), batch.doc_ret_pos, size, n_d, filler)
    return queries, docs


@torch.no_grad()
def _encode(lm: torch.nn.Module, planned: list[tuple[Chunk, torch.Tensor]], n_vectors: int) -> torch.Tensor:
    """Step 1: the raw RET states (at least fp32) of ``n_vectors`` vectors, chunk by chunk, without a graph."""
    decoder = decoder_of(lm)
    out = None
    for chunk, take in planned:
        chunk.rng = _rng_state()
        h = upcast(last_hidden(decoder, chunk.input_ids, chunk.attention_mask, chunk.position_ids))
        if out is None:
            out = torch.zeros(n_vectors, h.shape[-1], dtype=h.dtype, device=h.device)
        out[take] = h[chunk.ret_rows, chunk.ret_pos]
    if out is None:
        raise ValueError("grad cache: no chunk was encoded")
    return out


def replay_loss(lm: torch.nn.Module, chunks: list[Chunk], cfg: LossConfig, world_size: int,
                norm_gen: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step 3 for the chunks of one micro-step: (loss to back-propagate, generation CE sum, its count) —
    per chunk the surrogate ``<RET states, cached gradient>`` plus its generation loss, normalised as
    the plain step's."""
    lam_g, _ = cfg.effective_lambdas()
    loss = None
    gen_sum = n_gen = torch.zeros((), device=chunks[0].input_ids.device)
    for chunk in chunks:
        if chunk.rng is not None:
            _set_rng(chunk.rng)
        h = last_hidden(decoder_of(lm), chunk.input_ids, chunk.attention_mask, chunk.position_ids)
        part = upcast(h.sum()) * 0.0  # every parameter of the decoder gets a gradient, on every rank
        if chunk.ret_grad is not None and chunk.ret_grad.shape[0]:
            part = part + (upcast(h[chunk.ret_rows, chunk.ret_pos]) * chunk.ret_grad).sum()
        if chunk.gen_targets is not None:
            g, n = gen_loss_sum(h, chunk.gen_targets, lm.get_output_embeddings())
            part = part + lam_g * g * (world_size / max(norm_gen, 1.0))
            gen_sum, n_gen = gen_sum + g.detach(), n_gen + n
        loss = part if loss is None else loss + part
    return loss, gen_sum, n_gen


def cached_micro_batch(engine: Any, batch: Batch, cfg: LossConfig, totals: tuple[float, float], world_size: int,
                       last: bool, device: torch.device) -> dict[str, float]:
    """Steps 1–3 for one micro-batch through ``engine`` (a DeepSpeed engine wrapping
    ``pipeline.wrapper.OneGenTrainModule``); returns its global statistics like ``compute_joint_loss``.
    ``last``: the optimizer step ends with this micro-batch."""
    lm = engine.module.lm
    queries, docs = plan_chunks(batch, cfg, device)
    q = _encode(lm, queries, batch.num_ret).requires_grad_()
    d = _encode(lm, docs, batch.num_docs).requires_grad_()
    after = _rng_state()  # the stream the step goes on with, whatever the re-runs draw
    ret_sum, n_ret, hits, n_acc = retrieval_from_vectors(q, d, batch, cfg, world_size, None)
    _, lam_r = cfg.effective_lambdas()
    (lam_r * ret_sum * (world_size / max(totals[1], 1.0))).backward()
    for vectors, planned in ((q, queries), (d, docs)):
        grad = vectors.grad if vectors.grad is not None else torch.zeros_like(vectors)
        for chunk, take in planned:
            chunk.ret_grad = grad[take]
    gen_sum, n_gen = torch.zeros((), device=device), torch.zeros((), device=device)
    # A query chunk and a doc chunk per micro-step (as the plain step runs both sides in one): half the
    # backwards, whose fixed cost (ZeRO-3 gathers and reductions) otherwise dominates small chunks.
    replays = [[side[i][0] for side in (queries, docs) if i < len(side)] for i in range(max(len(queries), len(docs)))]
    for i, chunks in enumerate(replays):
        engine.set_gradient_accumulation_boundary(last and i == len(replays) - 1)
        loss = engine(chunks, totals=totals)
        g, n = engine.module.last_replay
        gen_sum, n_gen = gen_sum + g, n_gen + n
        engine.backward(loss, scale_wrt_gas=False)  # normalised by the whole step's counts already
        engine.step()
    _set_rng(after)
    g = global_sums([gen_sum, n_gen, ret_sum, n_ret, hits, n_acc], world_size)
    return summarize(g, cfg)
