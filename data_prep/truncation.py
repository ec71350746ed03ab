"""Rows and documents shortened to fit: counted per shard, summed into the manifest, and said.

A query row longer than ``tagging.max_length`` loses tokens of its inserted paragraphs; a document
row longer than ``tagging.max_doc_length`` loses the end of its text (``data_prep.tagging``). Either
changes what the model learns, so it is never silent: each shard writes ``shard-NNNNN.cut.json``
(``{"cut": n}``, before the shard itself, so a finished shard always has one: a resumed run or a
job array counts the same), and ``finish`` sums them into the manifest::

    "truncated": {"rows": 12, "docs": 40, "max_length": 512, "max_doc_length": 128}

and prints ``[prep] cut 12 of 2000 rows to 512 tokens and 40 of 3301 documents to 128 tokens``.

Every cut is also listed: the sidecar carries one entry per cut document or row (``"items"``, from
``Tagger.cut_log``), and ``finish`` writes them all to ``OUT/truncated.jsonl``, doc shards first, in
shard and row order, one line each::

    {"doc_id": "Alû", "tokens": 301, "kept": 260, "reason": "document longer than tagging.max_doc_length 260: ..."}
    {"example_id": "5a8b...", "tokens": 733, "kept": 512, "reason": "row longer than tagging.max_length 512: ..."}

(``tokens``: the row's length before cutting; ``kept``: after; both count BOS/RET/special tokens.)
"""

from __future__ import annotations

import json
from pathlib import Path

from onegen.manifest import atomic_write_bytes, atomic_write_json

REPORT = "truncated.jsonl"


def sidecar(directory: str | Path, index: int) -> Path:
    return Path(directory) / f"shard-{index:05d}.cut.json"


def write_cut_count(directory: str | Path, index: int, cut: int, items: list[dict] | None = None) -> None:
    atomic_write_json(sidecar(directory, index), {"cut": int(cut), "items": list(items or [])})


def write_report(out: str | Path) -> int:
    """``OUT/truncated.jsonl`` from every shard's sidecar (docs, then queries); returns its line count."""
    lines = []
    for sub in ("docs", "queries"):
        for shard in sorted((Path(out) / sub).glob("shard-*.arrow")):
            side = shard.parent / (shard.stem + ".cut.json")
            if side.is_file():
                lines += [json.dumps(it, ensure_ascii=False, sort_keys=True) + "\n"
                          for it in json.loads(side.read_text()).get("items", [])]
    atomic_write_bytes(Path(out) / REPORT, "".join(lines).encode())
    return len(lines)


def _sum(directory: Path) -> tuple[int, int]:
    """(rows cut, shards without a count: written by a version that did not count)."""
    total, unknown = 0, 0
    for shard in sorted(directory.glob("shard-*.arrow")):
        side = directory / (shard.stem + ".cut.json")
        if side.is_file():
            total += int(json.loads(side.read_text()).get("cut", 0))
        else:
            unknown += 1
    return total, unknown


def count_cuts(out: str | Path, max_length: int, max_doc_length: int) -> dict:
    """The manifest's ``truncated`` entry of the prepared dataset in ``out``."""
    rows, unknown_q = _sum(Path(out) / "queries")
    docs, unknown_d = _sum(Path(out) / "docs")
    entry = {"rows": rows, "docs": docs, "max_length": max_length, "max_doc_length": max_doc_length}
    if unknown_q or unknown_d:
        entry["uncounted_shards"] = unknown_q + unknown_d
    return entry


def describe_cuts(truncated: dict, n_rows: int, n_docs: int) -> str | None:
    """The ``[prep]`` line (without the prefix); None when nothing was cut."""
    if not (truncated["rows"] or truncated["docs"]):
        return None
    return (f"cut {truncated['rows']} of {n_rows} rows to {truncated['max_length']} tokens and "
            f"{truncated['docs']} of {n_docs} documents to {truncated['max_doc_length']} tokens "
            f"(tagging.max_length / tagging.max_doc_length; counts in manifest.json 'truncated')")
