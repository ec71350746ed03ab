"""The text a separate retriever (BM25, a dense encoder) sees of a document: its title and text.

One definition for both users: hard-negative mining (``data_prep.mining``) and the pipeline baselines
of evaluation (``evaluation.retrievers``), so the baselines search the same text mining ranked.
"""

from __future__ import annotations

from typing import Protocol


class HasTitleText(Protocol):  # data_prep.records.Document
    title: str
    text: str


def doc_text(doc: HasTitleText) -> str:
    """The text both BM25 and the dense encoder see for a document."""
    return f"{doc.title}\n{doc.text}".strip()
