"""Split one benchmark file into a training part and a held-out part by question id (``holdout.*``).

Membership is a pure function of ``(example_id, seed)``::

    u = int(sha256(f"{seed}:{example_id}").hexdigest()[:16], 16) / 2**64      # in [0, 1)
    held out  <=>  u < fraction

so two prep runs of the same input with ``holdout.part=train`` and ``holdout.part=heldout`` (same
``fraction`` and ``seed``) never share a question and together cover every one, whatever the order
of the file, ``--max-examples``, ``num_proc`` or job-array slicing (the split is applied right after
reading, before ``--max-examples``). Entity linking splits by the benchmark's document (text) id
before texts are cut into passages, so the passages of one text are all on one side.

Both parts keep the whole document pool of the file (the corpus), as ``--max-examples`` does: only
questions are split. A ``bpe:N`` tokenizer is trained on the texts of both parts (the whole file,
before ``--max-examples``), so the two parts share one tokenizer. The manifest's ``holdout`` entry records part, fraction, seed, the rule, the
counts and the sha256 of the sorted kept ids; ``OUT/split_ids.json`` lists those ids.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from onegen.errors import ConfigError
from onegen.manifest import atomic_write_bytes

RULE = "heldout iff int(sha256(f'{seed}:{example_id}').hexdigest()[:16], 16) / 2**64 < fraction"
IDS_FILE = "split_ids.json"


@dataclass
class HoldoutConfig:
    part: Literal["all", "train", "heldout"] = field(
        default="all", metadata={"help": "which questions to keep: all, train (not held out) or heldout; "
                                         "membership by sha256 of seed:example_id (data_prep/holdout.py)"})
    fraction: float = field(default=0.2, metadata={"help": "share of the questions held out, in [0, 1]"})
    seed: int = field(default=0, metadata={"help": "changes which questions are held out"})

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.fraction) <= 1.0:
            raise ConfigError(f"holdout.fraction must be in [0, 1], got {self.fraction}")


def unit(example_id: str, seed: int) -> float:
    """The id's position in [0, 1): deterministic, independent of the file's order."""
    digest = hashlib.sha256(f"{seed}:{example_id}".encode()).hexdigest()
    return int(digest[:16], 16) / 2**64


def is_heldout(example_id: str, fraction: float, seed: int) -> bool:
    return unit(example_id, seed) < fraction


def select(examples: list, cfg: HoldoutConfig) -> tuple[list, int]:
    """The examples of ``cfg.part`` (in file order) and how many of the other part were dropped."""
    if cfg.part == "all":
        return list(examples), 0
    want = cfg.part == "heldout"
    kept = [ex for ex in examples if is_heldout(ex.example_id, cfg.fraction, cfg.seed) == want]
    return kept, len(examples) - len(kept)


def ids_sha256(ids: list[str]) -> str:
    return hashlib.sha256(json.dumps(sorted(ids), ensure_ascii=False).encode()).hexdigest()


def record(cfg: HoldoutConfig, kept_ids: list[str], dropped: int, dropped_by_max_examples: int) -> dict:
    """The manifest's ``holdout`` entry (``kept_ids``: the examples used, after ``--max-examples``)."""
    return {"part": cfg.part, "fraction": cfg.fraction, "seed": cfg.seed, "rule": RULE,
            "kept": len(kept_ids), "dropped": dropped, "dropped_by_max_examples": dropped_by_max_examples,
            "ids_sha256": ids_sha256(kept_ids), "ids_file": IDS_FILE}


def write_ids(out: str | Path, entry: dict, kept_ids: list[str]) -> None:
    """``OUT/split_ids.json``: the sorted ids of the examples used, with the rule that chose them."""
    body = {k: entry[k] for k in ("part", "fraction", "seed", "rule", "ids_sha256")}
    body["ids"] = sorted(kept_ids)
    atomic_write_bytes(Path(out) / IDS_FILE, (json.dumps(body, ensure_ascii=False, indent=0) + "\n").encode())


def describe(entry: dict) -> str:
    """The ``[prep]`` line (without the prefix)."""
    if entry["part"] == "all":
        return f"holdout: part=all, {entry['kept']} examples (ids in {IDS_FILE})"
    return (f"holdout: part={entry['part']} (fraction {entry['fraction']}, seed {entry['seed']}): kept "
            f"{entry['kept']} examples, dropped {entry['dropped']} of the other part"
            + (f" and {entry['dropped_by_max_examples']} past --max-examples" if entry["dropped_by_max_examples"] else "")
            + f" (ids in {IDS_FILE})")
