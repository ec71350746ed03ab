"""The model's own hidden states: the base transformer of a causal LM, and embeddings at RET positions.

``decoder_of`` / ``last_hidden`` are how the trainer's loss (``pipeline.forward``) and evaluation read a
model's last-layer states; ``hidden_at`` / ``encode_documents`` / ``query_vectors`` give the
L2-normalised states at RET positions, shared by the trainer's periodic evaluation and by
``evaluation`` (index building, teacher-forced Recall@1), so training and inference compute vectors in
exactly one way.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from onegen.padding import pad_rows
from onegen.roles import RET


def decoder_of(model: torch.nn.Module) -> torch.nn.Module:
    """The base transformer (hidden states without the LM head) of a HF causal LM."""
    get = getattr(model, "get_decoder", None)
    if callable(get):
        try:
            dec = get()
        except (AttributeError, NotImplementedError):
            dec = None
        if dec is not None and dec is not model:
            return dec
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        raise TypeError(f"cannot find the base transformer of {type(model).__name__}")
    return base


def last_hidden(decoder: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, L, H]`` last-layer states. With ``position_ids`` the rows are *packed* (several sequences per
    row, each restarting its positions at 0): no attention mask is passed, so transformers builds the
    block-diagonal causal mask from the position resets (flash-attn: its varlen path)."""
    if position_ids is not None:
        return decoder(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
    return decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


@torch.no_grad()
def hidden_at(model: torch.nn.Module, rows: Sequence[Sequence[int]], positions: Sequence[Sequence[int]],
              pad_id: int, batch_size: int = 32) -> list[np.ndarray]:
    """For each row, the normalised last-layer states at its ``positions`` ([n_i, H] float32)."""
    decoder = decoder_of(model)
    device = next(model.parameters()).device
    out: list[np.ndarray] = [None] * len(rows)  # type: ignore[list-item]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # similar lengths together: less padding
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        ids, mask = pad_rows([rows[i] for i in idx], pad_id)
        ids, mask = ids.to(device), mask.to(device)
        h = last_hidden(decoder, ids, mask)
        for j, i in enumerate(idx):
            pos = torch.as_tensor(list(positions[i]), dtype=torch.long, device=h.device)
            out[i] = F.normalize(h[j, pos].float(), dim=-1).cpu().numpy()
    return out


def encode_documents(model: torch.nn.Module, doc_rows: Sequence[Sequence[int]], pad_id: int,
                     batch_size: int = 64) -> np.ndarray:
    """[N, H] float32: one vector per document, the state of its final RET token."""
    if not doc_rows:
        return np.zeros((0, 0), dtype=np.float32)
    vecs = hidden_at(model, doc_rows, [[len(r) - 1] for r in doc_rows], pad_id, batch_size)
    return np.concatenate(vecs, axis=0)


def query_vectors(model: torch.nn.Module, rows: Sequence[Sequence[int]], roles: Sequence[Sequence[int]],
                  pad_id: int, batch_size: int = 32) -> list[np.ndarray]:
    """Teacher-forced query vectors: the states at every RET position of each full row."""
    positions = [np.flatnonzero(np.asarray(r) == RET).tolist() for r in roles]
    return hidden_at(model, rows, positions, pad_id, batch_size)
