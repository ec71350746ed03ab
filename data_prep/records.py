"""What the readers produce: benchmark-independent records that the tagger turns into token rows.

Every reader (HotpotQA, 2Wiki, ELEVANT, the OneGen reference format, the synthetic world) yields
these and nothing else, so tagging, mining and sharding never see a benchmark's own layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Document:
    """A retrievable unit: a paragraph (RAG) or an entity description (entity linking)."""

    doc_id: str
    title: str
    text: str


@dataclass
class MultiHopExample:
    """A multi-hop question.

    ``hops`` are the gold doc ids in the order the answer needs them (one ``[RQ]`` per hop);
    ``context_doc_ids`` are the question's own paragraphs (gold + distractors): the candidates in
    the distractor setting, and valid hard negatives. ``answer_aliases`` includes ``answer``.
    ``hop_leads`` optionally gives, per hop, the short text the model writes before ``[RQ]``
    (e.g. from 2Wiki evidences); None uses the template's default lead.
    """

    example_id: str
    question: str
    answer: str
    hops: list[str]
    context_doc_ids: list[str]
    answer_aliases: list[str] = field(default_factory=list)
    qtype: str = ""
    hop_leads: list[str] | None = None
    source: str = ""
    line: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Mention:
    """A labelled span: character offsets into the example's text, end exclusive.

    ``entity_id`` is a KB id (Wikidata QID in ELEVANT), or ``NIL_ID`` for a mention whose entity is
    not in the KB (ELEVANT's ``<NIL>`` and ``<NO_MAPPING>`` both map here; ``raw_entity_id`` keeps
    the original).
    """

    start: int
    end: int
    entity_id: str
    surface: str = ""
    raw_entity_id: str = ""


NIL_ID = "<NIL>"


@dataclass
class LinkingExample:
    """An entity-linking document: text plus gold mentions (sorted by start)."""

    example_id: str
    text: str
    mentions: list[Mention]
    source: str = ""
    line: int | None = None


@dataclass
class Dataset:
    """What a reader returns: examples plus the document pool they retrieve from."""

    task: str  # "rag" or "el"
    examples: list[MultiHopExample] | list[LinkingExample]
    documents: dict[str, Document]
    source: str = ""
    notes: list[str] = field(default_factory=list)
    # How prepare chose the examples (data_prep.holdout.record: part, fraction, seed, counts, ids);
    # empty straight from a reader.
    selection: dict[str, Any] = field(default_factory=dict)
