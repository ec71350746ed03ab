"""Turns prepared query rows into one training batch: a query micro-batch and a document micro-batch.

Roles are the single source of truth (design §1): CE targets come from
``onegen.roles.next_token_targets``; RET positions are where ``roles == RET``. Both micro-batches are
right-padded *dynamically* to their own longest row (rounded up to ``pad_to_multiple_of``), never
to a global maximum length. Query and document rows are separate forwards because their lengths
differ a lot. With ``packing`` the padded micro-batches are then packed into a few long sequences
(``pipeline.packing``).

Modes (paper Table 8):

* ``onegen``: generation and retrieval in the same sequence; the query RET vectors are read from the
  query rows themselves.
* ``git``: generation only; no documents and no RET vectors (RET tokens the model must emit still get
  their CE target).
* ``rit``: retrieval only; no CE targets.
* ``grit``: generation and retrieval never share a sequence: the query row is a generation row, and
  each RET position adds a separate retrieval row (the row's prefix up to and including that RET
  token, whose RET vector is its last token). Retrieval rows are appended to the query micro-batch
  (causal rows don't see each other) with no CE targets.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, fields
from typing import Any, Callable

import numpy as np
import torch

from onegen.padding import pad_rows
from onegen.roles import IGNORE_INDEX, RET, next_token_targets
from pipeline.config import MODES
from pipeline.negatives import pick_negatives
from pipeline.packing import pack_batch

DocsLookup = Callable[[list[str]], list[dict[str, Any]]]


def doc_id_hash(doc_id: str) -> int:
    """Stable signed int64 of a doc id (same on every rank and run, unlike ``hash()``)."""
    return int.from_bytes(hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


@dataclass
class CollatorConfig:
    mode: str = field(default="onegen", metadata={"help": "onegen | git | rit | grit"})
    num_negatives: int = field(default=1, metadata={"help": "hard negatives sampled per RET position"})
    max_docs_per_batch: int | None = field(
        default=None, metadata={"help": "cap on unique docs per batch; negatives are dropped first, positives never"}
    )
    pad_to_multiple_of: int | None = field(default=8, metadata={"help": "round padded lengths up to a multiple"})
    seed: int = field(default=0, metadata={"help": "seed of the negative sampling"})
    packing: bool = field(default=False, metadata={"help": "pack rows into long sequences with position_ids (TrainConfig data.packing)"})
    pack_tokens: int = field(default=0, metadata={"help": "most tokens per packed sequence; 0: see pack_attention_at"})
    pack_attention_at: float = field(default=0.0, metadata={"help": "pack_tokens 0: the width at which dense attention costs as much as the rest (packing.attention_width): bins sized by packing.choose_capacity; 0: one sequence per micro-batch side"})

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r} is not one of {MODES}")
        if self.num_negatives < 0:
            raise ValueError(f"num_negatives must be >= 0, got {self.num_negatives}")


@dataclass
class Batch:
    """One training batch. ``B`` query-micro-batch rows, ``D`` unique docs, ``R`` query RET vectors.

    The ``q_*`` tensors index the query micro-batch (row, position) and the doc micro-batch
    (positive / negatives) for every query RET vector.
    """

    mode: str
    input_ids: torch.Tensor  # [B, L] int64 (grit: generation rows, then retrieval rows)
    attention_mask: torch.Tensor  # [B, L] int64, 1 on real tokens
    gen_targets: torch.Tensor  # [B, L] int64, IGNORE_INDEX where no CE target
    q_ret_row: torch.Tensor  # [R] int64
    q_ret_pos: torch.Tensor  # [R] int64
    q_pos_doc: torch.Tensor  # [R] int64 index into the doc micro-batch
    q_neg_doc: torch.Tensor  # [R, K] int64, -1 where padded
    q_neg_mask: torch.Tensor  # [R, K] bool, True on real negatives
    q_pos_hash: torch.Tensor  # [R] int64 doc_id_hash of the positive
    doc_input_ids: torch.Tensor  # [D, Ld] int64
    doc_attention_mask: torch.Tensor  # [D, Ld] int64
    doc_ret_pos: torch.Tensor  # [D] int64, last real token of each doc row
    doc_hash: torch.Tensor  # [D] int64
    doc_ids: list[str]
    example_ids: list[str]  # one per query row given to the collator
    q_pos_ids: list[str]  # [R] positive doc id strings
    q_neg_ids: list[list[str]]  # [R] sampled negative doc ids
    # Packed batches (``data.packing``): per-token positions restarting at 0 for each packed sequence
    # (None: padded rows, positions from the attention mask), and the row of each doc's RET state.
    position_ids: torch.Tensor | None = None  # [B, L] int64
    doc_position_ids: torch.Tensor | None = None  # [D', Ld] int64
    doc_ret_row: torch.Tensor | None = None  # [D] int64 (None: doc i is row i)

    @property
    def num_docs(self) -> int:
        return len(self.doc_ids)  # not doc_input_ids' rows: packed, several docs share a row

    @property
    def num_ret(self) -> int:
        return int(self.q_ret_row.shape[0])

    def num_gen_targets(self) -> int:
        return int((self.gen_targets != IGNORE_INDEX).sum())

    def num_tokens(self) -> int:
        """Real (non-pad) tokens fed through the model: query and doc micro-batches."""
        return int(self.attention_mask.sum()) + int(self.doc_attention_mask.sum())

    def num_slots(self) -> int:
        """Positions fed through the model, padding included: query and doc tensors."""
        return self.input_ids.numel() + self.doc_input_ids.numel()

    def padding_fraction(self) -> float:
        """Pad tokens over all positions of the query and doc tensors (what padding or packing wastes)."""
        total = self.num_slots()
        return 1.0 - self.num_tokens() / total if total else 0.0

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        kw = {}
        for f in fields(self):
            v = getattr(self, f.name)
            kw[f.name] = v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
        return Batch(**kw)


class OneGenCollator:
    """``collator(query_rows, epoch) -> Batch``; ``docs_lookup(doc_ids)`` returns prepared doc rows in order."""

    def __init__(self, docs_lookup: DocsLookup, pad_id: int, cfg: CollatorConfig | None = None) -> None:
        self.docs_lookup = docs_lookup
        self.pad_id = int(pad_id)
        self.cfg = cfg or CollatorConfig()

    def __call__(self, query_rows: list[dict[str, Any]], epoch: int = 0) -> Batch:
        if not query_rows:
            raise ValueError("empty batch: no query rows")
        cfg = self.cfg
        with_gen = cfg.mode != "rit"
        with_ret = cfg.mode != "git"

        ids = [np.asarray(r["input_ids"], dtype=np.int64) for r in query_rows]
        roles = [np.asarray(r["roles"], dtype=np.int8) for r in query_rows]
        targets = [
            next_token_targets(i, ro, is_query=True) if with_gen else np.full(i.shape, IGNORE_INDEX, dtype=np.int64)
            for i, ro in zip(ids, roles)
        ]

        # (row, pos, positive, negatives) of every query RET vector.
        rets = self._query_rets(query_rows, roles, epoch) if with_ret else []

        if cfg.mode == "grit":
            # Each RET vector comes from its own prefix row, so generation and retrieval never share a sequence.
            base = len(ids)
            for j, (b, p, pos_id, negs) in enumerate(rets):
                ids.append(ids[b][: p + 1])
                targets.append(np.full(p + 1, IGNORE_INDEX, dtype=np.int64))
                rets[j] = (base + j, p, pos_id, negs)

        doc_ids, rets = self._choose_docs(rets)
        doc_tok = self._doc_tokens(doc_ids)

        input_ids, attention_mask = pad_rows(ids, self.pad_id, cfg.pad_to_multiple_of)
        gen_targets, _ = pad_rows(targets, IGNORE_INDEX, cfg.pad_to_multiple_of)
        doc_input_ids, doc_attention_mask = pad_rows(doc_tok, self.pad_id, cfg.pad_to_multiple_of)

        index = {d: i for i, d in enumerate(doc_ids)}
        k = max((len(n) for *_, n in rets), default=0)
        q_neg_doc = torch.full((len(rets), k), -1, dtype=torch.long)
        for j, (*_, negs) in enumerate(rets):
            q_neg_doc[j, : len(negs)] = torch.tensor([index[n] for n in negs], dtype=torch.long)

        batch = Batch(
            mode=cfg.mode,
            input_ids=input_ids,
            attention_mask=attention_mask,
            gen_targets=gen_targets,
            q_ret_row=torch.tensor([r[0] for r in rets], dtype=torch.long),
            q_ret_pos=torch.tensor([r[1] for r in rets], dtype=torch.long),
            q_pos_doc=torch.tensor([index[r[2]] for r in rets], dtype=torch.long),
            q_neg_doc=q_neg_doc,
            q_neg_mask=q_neg_doc >= 0,
            q_pos_hash=torch.tensor([doc_id_hash(r[2]) for r in rets], dtype=torch.long),
            doc_input_ids=doc_input_ids,
            doc_attention_mask=doc_attention_mask,
            doc_ret_pos=torch.tensor([len(t) - 1 for t in doc_tok], dtype=torch.long),
            doc_hash=torch.tensor([doc_id_hash(d) for d in doc_ids], dtype=torch.long),
            doc_ids=doc_ids,
            example_ids=[str(r.get("example_id", "")) for r in query_rows],
            q_pos_ids=[r[2] for r in rets],
            q_neg_ids=[r[3] for r in rets],
        )
        return pack_batch(batch, cfg.pack_tokens, self.pad_id, cfg.pad_to_multiple_of, cfg.pack_attention_at) if cfg.packing else batch

    def _query_rets(self, query_rows: list[dict[str, Any]], roles: list[np.ndarray],
                    epoch: int) -> list[tuple[int, int, str, list[str]]]:
        """(row, pos, positive, negatives) of every query RET vector, its negatives drawn for ``epoch``."""
        cfg = self.cfg
        rets: list[tuple[int, int, str, list[str]]] = []
        for b, (row, ro) in enumerate(zip(query_rows, roles)):
            positions = np.flatnonzero(ro == RET)
            positives = list(row.get("positives") or [])
            if len(positives) != len(positions):
                raise ValueError(
                    f"example {row.get('example_id')!r}: {len(positions)} RET tokens but {len(positives)} positives"
                )
            mined = list(row.get("negatives") or [[] for _ in positions])
            own_positives = set(positives)
            for hop, (p, pos_id) in enumerate(zip(positions, positives)):
                # A gold doc of any hop of this example is never its negative.
                pool = [d for d in (mined[hop] if hop < len(mined) else []) if d not in own_positives]
                negs = pick_negatives(pool, cfg.num_negatives, str(row.get("example_id", b)), hop, epoch, cfg.seed)
                rets.append((b, int(p), pos_id, negs))
        return rets

    def _doc_tokens(self, doc_ids: list[str]) -> list[np.ndarray]:
        """The token ids of ``doc_ids`` from ``docs_lookup``, checked: the docs asked for, in order, each ending with RET."""
        doc_rows = self.docs_lookup(doc_ids) if doc_ids else []
        if len(doc_rows) != len(doc_ids):
            raise ValueError(f"docs_lookup returned {len(doc_rows)} rows for {len(doc_ids)} doc ids")
        doc_tok = []
        for want, d in zip(doc_ids, doc_rows):
            if d["doc_id"] != want:
                raise ValueError(f"docs_lookup returned doc {d['doc_id']!r} where {want!r} was asked for")
            r = np.asarray(d["roles"], dtype=np.int8)
            if r.size == 0 or r[-1] != RET:
                raise ValueError(f"doc {want!r} does not end with its RET token")
            doc_tok.append(np.asarray(d["input_ids"], dtype=np.int64))
        return doc_tok

    def _choose_docs(
        self, rets: list[tuple[int, int, str, list[str]]]
    ) -> tuple[list[str], list[tuple[int, int, str, list[str]]]]:
        """Unique doc ids (positives first, then negatives by rank); drop negatives past the cap."""
        cap = self.cfg.max_docs_per_batch
        docs = list(dict.fromkeys(p for _, _, p, _ in rets))
        if cap is not None and len(docs) > cap:
            raise ValueError(f"max_docs_per_batch={cap} is below the {len(docs)} positives of this batch")
        chosen = set(docs)
        depth = max((len(n) for *_, n in rets), default=0)
        # Round-robin over negative ranks so that a cap trims every query's negatives evenly.
        for i in range(depth):
            for _, _, _, negs in rets:
                if i < len(negs) and negs[i] not in chosen and (cap is None or len(docs) < cap):
                    docs.append(negs[i])
                    chosen.add(negs[i])
        kept = [(b, p, pos, [n for n in negs if n in chosen]) for b, p, pos, negs in rets]
        return docs, kept
