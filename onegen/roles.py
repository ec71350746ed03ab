"""Token roles: the single source of truth for what every token of a training sequence is for.

Encoding is fixed by the design (§1): ``roles`` is int8 per token, ``CTX = 0`` (context, no loss),
``GEN = 1`` (next-token cross-entropy), ``RET = 2`` (its last-layer hidden state is an embedding).
Labels are *derived* from roles, never stored.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

CTX: int = 0
GEN: int = 1
RET: int = 2
ROLE_NAMES = {CTX: "CTX", GEN: "GEN", RET: "RET"}
IGNORE_INDEX: int = -100


def next_token_targets(input_ids: Sequence[int], roles: Sequence[int], is_query: bool) -> np.ndarray:
    """CE target for every position: ``targets[t-1] = input_ids[t]`` iff token t is learned.

    Token t is learned when its role is GEN, or when it is RET in a *query* row (the model must
    learn to emit its own retrieval tokens). Document rows have no CE target at all. Positions
    without a target hold ``IGNORE_INDEX``; the last position never has one.
    """
    ids = np.asarray(input_ids, dtype=np.int64)
    r = np.asarray(roles, dtype=np.int8)
    if ids.shape != r.shape:
        raise ValueError(f"input_ids and roles differ in length: {ids.shape[0]} vs {r.shape[0]}")
    targets = np.full(ids.shape, IGNORE_INDEX, dtype=np.int64)
    if not is_query or ids.size < 2:
        return targets
    learned = (r[1:] == GEN) | (r[1:] == RET)
    targets[:-1] = np.where(learned, ids[1:], IGNORE_INDEX)
    return targets


def ret_positions(roles: Sequence[int]) -> np.ndarray:
    """Positions whose hidden state is an embedding (role RET), as int32."""
    return np.flatnonzero(np.asarray(roles, dtype=np.int8) == RET).astype(np.int32)


def check_row_invariants(roles: Sequence[int], is_query: bool) -> list[str]:
    """Problems with one row's roles (empty list when fine): used by data_prep and by tests.

    * the token after a RET token is CTX (so a RET position never predicts anything);
    * a document row ends with its RET token and has no GEN token.
    """
    r = np.asarray(roles, dtype=np.int8)
    problems: list[str] = []
    bad = set(np.unique(r).tolist()) - {CTX, GEN, RET}
    if bad:
        problems.append(f"unknown role values {sorted(bad)}")
    ret = np.flatnonzero(r == RET)
    for p in ret:
        if p + 1 < r.size and r[p + 1] != CTX:
            problems.append(f"token after RET at position {int(p)} has role {ROLE_NAMES.get(int(r[p + 1]), r[p + 1])}, expected CTX")
    if not is_query:
        if r.size == 0 or r[-1] != RET:
            problems.append("document row does not end with its RET token")
        if (r == GEN).any():
            problems.append("document row has GEN tokens")
    return problems
