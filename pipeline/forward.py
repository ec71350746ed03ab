"""The joint OneGen loss of one batch for any HF causal LM, correct under data parallelism.

Data-parallel engines (DeepSpeed ZeRO, DDP) *average* gradients over ranks. For N ranks to give the
gradients of one process on the concatenated global batch, every rank scales its loss as
``world_size × (local sum) / (global count)``; the counts are all-reduced without gradient. For
InfoNCE the doc vectors of all ranks are gathered with the differentiable
``torch.distributed.nn.functional.all_gather`` (its backward sums every rank's gradient into the
source rank; plain ``dist.all_gather`` silently drops them).

Every rank runs the same modules in the same order whatever its batch holds (lm_head on zero rows,
a one-token doc forward when it has no doc): ZeRO-3 gathers parameters in module hooks, and a rank
that skipped a module would deadlock the others.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

import onegen.distributed as collectives
from onegen.hidden import decoder_of, last_hidden
from pipeline.collator import Batch
from pipeline.config import LossConfig
from pipeline.loss import bpr_loss, gen_loss_sum, infonce_logits, infonce_loss, top1_hits, upcast


def _gather_docs(
    d: torch.Tensor, d_hash: torch.Tensor, world_size: int, group: Any
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """All ranks' doc vectors (differentiable) and hashes, and this rank's offset in them.

    Ranks hold different numbers of docs and ``all_gather`` needs equal shapes: pad to the largest,
    gather, strip.
    """
    n = torch.tensor([d.shape[0]], dtype=torch.long, device=d.device)
    sizes_l = [int(s) for s in collectives.all_gather_equal(n, group=group)]
    top = max(sizes_l)
    pad = top - d.shape[0]
    d_p = torch.cat([d, d.new_zeros(pad, d.shape[1])]) if pad else d
    h_p = torch.cat([d_hash, d_hash.new_zeros(pad)]) if pad else d_hash
    vecs = collectives.all_gather_autograd(d_p, group=group)
    hashes = collectives.all_gather_equal(h_p, group=group)
    rank = dist.get_rank(group=group)
    cand = torch.cat([v[:s] for v, s in zip(vecs, sizes_l)])
    cand_hash = torch.cat([h[:s] for h, s in zip(hashes, sizes_l)])
    return cand, cand_hash, sum(sizes_l[:rank])


def loss_counts(batch: Batch, cfg: LossConfig) -> tuple[int, int]:
    """This rank's (GEN targets, RET vectors) that count in the loss's means, known before any forward.

    The trainer sums them over a step's micro-batches and all ranks, and passes the totals to
    ``compute_joint_loss(totals=...)``: gradient accumulation then gives the gradients of one
    micro-batch holding every row of the step (each micro-batch normalised by its own count would
    weigh a short micro-batch's tokens more).
    """
    n_gen = batch.num_gen_targets() if cfg.uses_gen else 0
    if not cfg.uses_ret:
        return n_gen, 0
    if cfg.ret_loss == "infonce":
        return n_gen, batch.num_ret
    return n_gen, int((batch.q_neg_mask.sum(1) > 0).sum())  # BPR: queries with at least one negative


def _retrieval_sum(
    decoder: torch.nn.Module, hq: torch.Tensor, batch: Batch, cfg: LossConfig, world_size: int, group: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed retrieval loss, its count, top-1 hits and the queries they were counted over."""
    if batch.num_docs:
        hd = last_hidden(decoder, batch.doc_input_ids, batch.doc_attention_mask, batch.doc_position_ids)
        d = hd[doc_rows(batch), batch.doc_ret_pos]
        keep = d.sum() * 0.0
    else:  # a one-token forward: every rank runs the same modules (see the module docstring)
        hd = last_hidden(decoder, batch.input_ids[:1, :1], batch.attention_mask[:1, :1])
        d = hd.new_zeros(0, hd.shape[-1])
        keep = hd.sum() * 0.0
    ret_sum, n_ret, hits, n_acc = retrieval_from_vectors(hq[batch.q_ret_row, batch.q_ret_pos], d, batch, cfg,
                                                         world_size, group)
    return ret_sum + keep, n_ret, hits, n_acc


def doc_rows(batch: Batch) -> torch.Tensor:
    """The row of each document's RET state in the doc micro-batch (packed: several docs per row)."""
    if batch.doc_ret_row is not None:
        return batch.doc_ret_row
    return torch.arange(batch.num_docs, device=batch.doc_ret_pos.device)


def retrieval_from_vectors(
    q: torch.Tensor, d: torch.Tensor, batch: Batch, cfg: LossConfig, world_size: int, group: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The retrieval loss of this rank's query RET states ``q`` ``[R, H]`` against the doc RET states ``d``
    ``[D, H]`` (raw, normalised here): summed loss, its count, top-1 hits and the queries counted.

    The loss depends on the model only through ``q`` and ``d``: gradient caching (``pipeline.grad_cache``)
    calls this on cached vectors and back-propagates their gradients chunk by chunk.
    """
    q = F.normalize(upcast(q), dim=-1)
    d = F.normalize(upcast(d), dim=-1)
    n_q = torch.tensor(q.shape[0], device=q.device)
    if cfg.ret_loss == "infonce":
        if world_size > 1:
            cand, cand_hash, offset = _gather_docs(d, batch.doc_hash, world_size, group)
        else:
            cand, cand_hash, offset = d, batch.doc_hash, 0
        ret_sum, n_ret, hits = infonce_loss(q, batch.q_pos_doc + offset, cand, cand_hash, batch.q_pos_hash,
                                            cfg.temperature)
        return ret_sum + cand.sum() * 0.0 + q.sum() * 0.0, n_ret, hits, n_ret
    ret_sum, n_ret = bpr_loss(q, d[batch.q_pos_doc], d[batch.q_neg_doc.clamp(min=0)], batch.q_neg_mask)
    with torch.no_grad():
        logits = infonce_logits(q, batch.q_pos_doc, d, batch.doc_hash, batch.q_pos_hash, 1.0)
        hits = top1_hits(logits, batch.q_pos_doc)
    return ret_sum + d.sum() * 0.0 + q.sum() * 0.0, n_ret, hits, n_q


def compute_joint_loss(
    model: torch.nn.Module,
    batch: Batch,
    cfg: LossConfig,
    *,
    world_size: int = 1,
    group: Any = None,
    totals: tuple[float, float] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``L = λg·L_gen + λr·L_ret`` for this rank's part of the global batch, and global statistics.

    Returns the loss to backpropagate (already scaled by ``world_size``, see the module docstring)
    and ``stats``: ``loss``, ``loss_gen``, ``loss_ret`` (global means of this micro-batch),
    ``ret_acc`` (fraction of query RET vectors whose positive scores above every in-batch candidate:
    the gathered global candidates for InfoNCE, the local doc micro-batch for BPR), and the global
    sums and counts behind them (``gen_sum``, ``n_gen``, ``ret_sum``, ``n_ret``, ``hits``, ``n_acc``)
    so a step of several micro-batches can be summarised as one (``merge_stats``).

    ``totals``: the global (GEN, RET) counts of the whole optimizer step (``loss_counts`` summed over
    its micro-batches and ranks). The loss is then normalised by them, so the gradients accumulated
    over the step's micro-batches equal those of one micro-batch of all its rows; without them each
    micro-batch is normalised by its own global counts.
    """
    if batch.mode != cfg.mode:
        raise ValueError(f"batch was collated for mode {batch.mode!r} but the loss is configured for {cfg.mode!r}")
    lam_g, lam_r = cfg.effective_lambdas()
    decoder = decoder_of(model)
    hq = last_hidden(decoder, batch.input_ids, batch.attention_mask, batch.position_ids)
    zero = upcast(hq.sum()) * 0.0  # keeps the graph connected when a rank has nothing to learn from
    none = torch.zeros((), dtype=torch.long, device=hq.device)

    gen_sum, n_gen = (gen_loss_sum(hq, batch.gen_targets, model.get_output_embeddings()) if cfg.uses_gen
                      else (zero, none))
    ret_sum, n_ret, hits, n_acc = (_retrieval_sum(decoder, hq, batch, cfg, world_size, group) if cfg.uses_ret
                                   else (zero, none, none, none))
    g = global_sums([gen_sum, n_gen, ret_sum, n_ret, hits, n_acc], world_size, group)
    norm_gen, norm_ret = totals if totals is not None else (g["n_gen"], g["n_ret"])

    loss = zero + ret_sum * 0.0  # the doc forward stays in the graph even with λr = 0 (ZeRO-3 hooks)
    if lam_g:
        loss = loss + lam_g * gen_sum * (world_size / max(norm_gen, 1.0))
    if lam_r:
        loss = loss + lam_r * ret_sum * (world_size / max(norm_ret, 1.0))
    return loss, summarize(g, cfg)


STAT_KEYS = ("gen_sum", "n_gen", "ret_sum", "n_ret", "hits", "n_acc")


def global_sums(values: list[torch.Tensor], world_size: int, group: Any = None) -> dict[str, float]:
    """This rank's ``STAT_KEYS`` values (0-d tensors), summed over every rank, as floats (one all-reduce)."""
    local = torch.stack([v.detach().double() for v in values])
    if world_size > 1:
        collectives.all_reduce_(local, group=group)
    return dict(zip(STAT_KEYS, local.tolist()))


def summarize(g: dict[str, float], cfg: LossConfig) -> dict[str, float]:
    """Means from global sums and counts (the sums and counts are kept, for ``merge_stats``)."""
    lam_g, lam_r = cfg.effective_lambdas()
    mean_gen = g["gen_sum"] / max(g["n_gen"], 1.0)
    mean_ret = g["ret_sum"] / max(g["n_ret"], 1.0)
    return dict(g, loss=lam_g * mean_gen + lam_r * mean_ret, loss_gen=mean_gen, loss_ret=mean_ret,
                ret_acc=g["hits"] / g["n_acc"] if g["n_acc"] else 0.0, n_gen=int(g["n_gen"]), n_ret=int(g["n_ret"]))


def merge_stats(parts: list[dict[str, float]], cfg: LossConfig) -> dict[str, float]:
    """One step's statistics from its micro-batches': the means over all their tokens, weighted as the
    loss is when it is normalised by the step's totals."""
    return summarize({k: float(sum(p[k] for p in parts)) for k in STAT_KEYS}, cfg)
