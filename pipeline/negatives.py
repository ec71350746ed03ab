"""Hard-negative sampling as a pure function of (example, hop, epoch, seed) (tevatron style).

No global RNG and nothing about the rest of the batch enters the choice, so a run is reproducible,
resumes mid-epoch to the same negatives, and gives the same negatives on 1 or N data-parallel ranks.
"""

from __future__ import annotations

import hashlib


def _key(*parts: object) -> bytes:
    # \x1f (unit separator) keeps ("a1", 2) and ("a", 12) apart.
    return hashlib.blake2b("\x1f".join(str(p) for p in parts).encode("utf-8"), digest_size=16).digest()


def pick_negatives(mined: list[str], k: int, example_id: str, hop: int, epoch: int, seed: int) -> list[str]:
    """Sample ``k`` of ``mined`` without replacement (all of them, deduplicated, when fewer).

    Each candidate gets a hash score from (seed, epoch, example, hop, candidate) and the ``k`` lowest
    win: independent of the order of ``mined`` and of Python's ``random``/hash randomisation. The
    result keeps the mined order (the order in which negatives were ranked by the miner).
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    unique = list(dict.fromkeys(mined))
    if k >= len(unique):
        return unique
    score = {d: _key(seed, epoch, example_id, hop, d) for d in unique}
    chosen = set(sorted(unique, key=lambda d: score[d])[:k])
    return [d for d in unique if d in chosen]
