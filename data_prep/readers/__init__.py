"""Benchmark readers: raw benchmark files → ``data_prep.records.Dataset``.

``read_benchmark(kind, path, policy, **kw)`` dispatches on ``kind``:

- ``hotpotqa`` — ``read_hotpotqa(path, policy, require_gold_in_context=True)``
- ``2wiki``    — ``read_twowiki(path, policy, aliases_path=None, require_gold_in_context=True)``
- ``elevant``  — ``read_elevant(path, policy, kb_path=None)``
- ``onegen``   — ``read_onegen_reference(path, db_path, policy, fmt=None)`` (``path`` is train.jsonl)

Bad records raise ``onegen.errors.InputError`` naming file, line and field, or are quarantined by
an ``ErrorPolicy("skip")``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..records import Dataset
from .elevant import read_elevant, read_entity_kb
from .errors import ErrorPolicy
from .hotpotqa import read_hotpotqa
from .hub import load_from_hub
from .onegen_ref import OneGenRefFormat, read_onegen_reference
from .twowiki import read_answer_aliases, read_passage_corpus, read_twowiki

KINDS = ("hotpotqa", "2wiki", "elevant", "onegen")


def read_benchmark(kind: str, path: str | Path, policy: ErrorPolicy | None = None, **kw: Any) -> Dataset:
    """Read benchmark ``path`` of ``kind`` (one of ``KINDS``); ``kw`` goes to that reader."""
    if kind == "hotpotqa":
        return read_hotpotqa(path, policy, **kw)
    if kind == "2wiki":
        return read_twowiki(path, policy, **kw)
    if kind == "elevant":
        return read_elevant(path, policy, **kw)
    if kind == "onegen":
        if "db_path" not in kw:
            raise TypeError("read_benchmark('onegen', ...) needs db_path= (the reference db.jsonl)")
        return read_onegen_reference(path, kw.pop("db_path"), policy, **kw)
    raise ValueError(f"unknown benchmark kind {kind!r}; expected one of {list(KINDS)}")


__all__ = [
    "KINDS",
    "ErrorPolicy",
    "OneGenRefFormat",
    "load_from_hub",
    "read_answer_aliases",
    "read_benchmark",
    "read_elevant",
    "read_entity_kb",
    "read_hotpotqa",
    "read_onegen_reference",
    "read_passage_corpus",
    "read_twowiki",
]
