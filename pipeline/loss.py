"""The OneGen losses as pure torch functions (no DeepSpeed, no transformers). Their config (mode,
weights, retrieval loss, temperature) is the recipe's ``pipeline.config.LossConfig``.

Every function returns ``(sum, count)`` rather than a mean: the caller divides by the *global*
count over all data-parallel ranks, which is what makes N ranks give the gradients of one process
on the concatenated batch (see ``pipeline.forward``).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from onegen.roles import IGNORE_INDEX


def gen_loss_sum(
    hidden: torch.Tensor, targets: torch.Tensor, lm_head: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed float32 next-token CE over positions with a target, and the number of such positions.

    ``hidden`` is ``[B, L, H]``, ``targets`` ``[B, L]`` (``IGNORE_INDEX`` where none). The hidden
    states are gathered first and ``lm_head`` sees only ``[N, H]``: full-vocab logits for every
    position would cost B·L·V memory for nothing. ``lm_head`` is called even when N = 0 so that
    every data-parallel rank runs the same modules (ZeRO-3 gathers parameters in module hooks).
    """
    mask = targets != IGNORE_INDEX
    h = hidden[mask]
    logits = upcast(lm_head(h))
    total = F.cross_entropy(logits, targets[mask], reduction="sum") if h.shape[0] else logits.sum() * 0.0
    return total, mask.sum()


def upcast(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (bf16/fp16 -> fp32; fp64 stays fp64)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _normalize(x: torch.Tensor) -> torch.Tensor:
    # Idempotent on already-normalised inputs; never in half precision (scores differ by ~1e-3).
    return F.normalize(upcast(x), dim=-1)


def bpr_scores(q: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine scores: positive ``[N]`` and negatives ``[N, K]``."""
    q, pos, neg = _normalize(q), _normalize(pos), _normalize(neg)
    return (q * pos).sum(-1), torch.einsum("nh,nkh->nk", q, neg)


def bpr_loss(
    q: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, neg_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """BPR, ``-log σ(s⁺ − s⁻)`` with cosine scores, as in the paper.

    ``q``, ``pos``: ``[N, H]``; ``neg``: ``[N, K, H]`` (ragged negatives padded); ``neg_mask``:
    ``[N, K]`` bool, True for real negatives. Vectors are L2-normalised here (idempotent).
    Per query the loss is the *mean over its negatives*; the returned sum is over queries and the
    count is the number of queries with at least one negative (queries without one contribute
    nothing), so ``sum / count`` (with global counts) is the mean over queries.
    """
    s_pos, s_neg = bpr_scores(q, pos, neg)
    per_pair = -F.logsigmoid(s_pos.unsqueeze(1) - s_neg)
    m = neg_mask.to(per_pair.dtype)
    n_neg = m.sum(1)
    per_query = (per_pair * m).sum(1) / n_neg.clamp(min=1)
    return per_query.sum(), (n_neg > 0).sum()


def candidate_mask(pos_idx: torch.Tensor, cand_ids: torch.Tensor, q_pos_ids: torch.Tensor) -> torch.Tensor:
    """``[N, M]`` bool: which candidates count for each query.

    A doc id is counted once per query: a candidate with the positive's id other than the positive
    itself is a false negative (masked), and of several copies of any other id only the first counts
    (copies arise when two data-parallel ranks both hold a doc; without this, N ranks would not
    equal one process on the concatenated batch).
    """
    m = cand_ids.shape[0]
    same = cand_ids.unsqueeze(0) == cand_ids.unsqueeze(1)
    first = ~(same & torch.ones(m, m, dtype=torch.bool, device=cand_ids.device).tril(-1)).any(1)
    is_pos = torch.zeros(pos_idx.shape[0], m, dtype=torch.bool, device=cand_ids.device)
    is_pos[torch.arange(pos_idx.shape[0], device=cand_ids.device), pos_idx] = True
    same_as_pos = cand_ids.unsqueeze(0) == q_pos_ids.unsqueeze(1)
    return is_pos | (first.unsqueeze(0) & ~same_as_pos)


def infonce_logits(
    q: torch.Tensor,
    pos_idx: torch.Tensor,
    cand: torch.Tensor,
    cand_ids: torch.Tensor,
    q_pos_ids: torch.Tensor,
    temperature: float = 0.02,
) -> torch.Tensor:
    """``[N, M]`` cosine / τ, with masked candidates at -inf."""
    logits = _normalize(q) @ _normalize(cand).T / temperature
    return logits.masked_fill(~candidate_mask(pos_idx, cand_ids, q_pos_ids), float("-inf"))


def infonce_loss(
    q: torch.Tensor,
    pos_idx: torch.Tensor,
    cand: torch.Tensor,
    cand_ids: torch.Tensor,
    q_pos_ids: torch.Tensor,
    temperature: float = 0.02,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """InfoNCE over every candidate doc vector of the (global) batch; returns (summed CE, N, top-1 hits).

    ``q``: ``[N, H]`` query vectors; ``pos_idx``: ``[N]`` index of each query's own positive in
    ``cand`` (``[M, H]``); ``cand_ids``: ``[M]`` int64 doc-id hashes; ``q_pos_ids``: ``[N]`` the
    hash of each query's positive. Masking: see :func:`candidate_mask`. The hits (:func:`top1_hits`,
    no gradient) are the queries whose positive beats every candidate, from the same logits.
    """
    logits = infonce_logits(q, pos_idx, cand, cand_ids, q_pos_ids, temperature)
    with torch.no_grad():
        hits = top1_hits(logits, pos_idx)
    if q.shape[0] == 0:
        return logits.sum() * 0.0 + cand.sum() * 0.0, torch.zeros((), dtype=torch.long, device=q.device), hits
    return F.cross_entropy(logits, pos_idx, reduction="sum"), torch.tensor(q.shape[0], device=q.device), hits


def top1_hits(logits: torch.Tensor, pos_idx: torch.Tensor) -> torch.Tensor:
    """Number of rows whose positive scores strictly above every other (unmasked) candidate."""
    if logits.shape[0] == 0:
        return torch.zeros((), dtype=torch.long, device=logits.device)
    s_pos = logits.gather(1, pos_idx.unsqueeze(1))
    others = logits.scatter(1, pos_idx.unsqueeze(1), float("-inf"))
    return (s_pos.squeeze(1) > others.max(1).values).sum()
