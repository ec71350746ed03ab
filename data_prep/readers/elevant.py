"""ELEVANT entity-linking benchmarks → ``LinkingExample``; an entity KB → entity documents.

Benchmark layout (one document per line): ``{"id", "title", "text", "evaluation_span": [s, e],
"labels": [{"id", "span": [s, e], "entity_id", "name", "type"}]}``; spans are character offsets
into ``text``, end exclusive. ``<NIL>`` and ``<NO_MAPPING>`` map to ``NIL_ID`` (the raw value is
kept in ``Mention.raw_entity_id``).

Choices:
- Overlapping spans are kept (ELEVANT's format allows nested mentions through ``parent``/``children``;
  the shipped benchmarks have none) and counted in a note, so a tagger that cannot mark them
  can decide; exact-duplicate spans are counted the same way.
- Labels outside ``evaluation_span`` are kept too (ELEVANT only scores inside it); documents whose
  span does not cover the whole text are counted in a note.
- Gold entities missing from a given KB are not errors (every real KB is incomplete): a note counts
  them, since they cap recall.
- Without a KB the entity documents are built from the benchmark's own labels (name only), with a
  note saying why that is weaker.

KB layout: JSON Lines of ``{"id", "name", "description"}`` → ``Document(doc_id=id, title=name,
text=description)``.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from onegen.errors import InputError

from ..records import NIL_ID, Dataset, Document, LinkingExample, Mention
from .errors import ErrorPolicy, RecordPass, resolve_policy
from .jsonio import RawRecord, iter_records

NIL_MARKERS = ("<NIL>", "<NO_MAPPING>")
FALLBACK_KB_NOTE = (
    "no entity KB given: entity documents were built from the benchmark's own labels (title = label name, "
    "no description). This is weaker than a real KB: names alone cannot tell namesakes apart, and the KB holds "
    "exactly the gold entities, so retrieval faces no unrelated candidates and scores are optimistic."
)


def _span(rec: RawRecord, value: object, field: str, text_len: int) -> tuple[int, int]:
    rec.check(value, list, field)
    if len(value) != 2:
        raise rec.error(field, f"expected [start, end], got a list of {len(value)} items")
    start = rec.check(value[0], int, f"{field}[0]")
    end = rec.check(value[1], int, f"{field}[1]")
    if start >= end:
        raise rec.error(field, f"start {start} >= end {end}")
    if start < 0 or end > text_len:
        raise rec.error(field, f"span [{start}, {end}] outside the text (length {text_len})")
    return start, end


def _mention(rec: RawRecord, label: object, i: int, text: str) -> tuple[Mention, str]:
    where = f"labels[{i}]"
    rec.check(label, dict, where)
    if "span" not in label:
        raise rec.error(f"{where}.span", "missing field")
    if "entity_id" not in label:
        raise rec.error(f"{where}.entity_id", "missing field")
    start, end = _span(rec, label["span"], f"{where}.span", len(text))
    raw = rec.check(label["entity_id"], str, f"{where}.entity_id").strip()
    if not raw:
        raise rec.error(f"{where}.entity_id", "empty entity id")
    name = rec.check(label.get("name", ""), str, f"{where}.name").strip()
    entity_id = NIL_ID if raw in NIL_MARKERS else raw
    return Mention(start=start, end=end, entity_id=entity_id, surface=text[start:end], raw_entity_id=raw), name


def parse_elevant_record(rec: RawRecord, tally: Counter) -> tuple[LinkingExample, dict[str, str]]:
    """One benchmark document → its example and ``{entity_id: label name}`` for the fallback KB."""
    rec.record_id = str(rec.get("id", (int, str)))
    text = rec.text("text")
    labels = rec.get("labels", list)
    mentions, names = [], {}
    for i, label in enumerate(labels):
        mention, name = _mention(rec, label, i, text)
        mentions.append(mention)
        if mention.entity_id != NIL_ID:
            names.setdefault(mention.entity_id, name)
    mentions.sort(key=lambda m: (m.start, m.end))

    span = rec.get("evaluation_span", list, required=False)
    if span is not None and _span(rec, span, "evaluation_span", len(text)) != (0, len(text)):
        tally["documents have an evaluation_span narrower than the text (all labels kept)"] += 1
    for a, b in zip(mentions, mentions[1:]):
        if b.start < a.end:
            tally["pairs of overlapping mention spans (kept)"] += 1
    example = LinkingExample(example_id=rec.record_id, text=text, mentions=mentions, source=str(rec.path), line=rec.line)
    return example, names


def read_entity_kb(path: str | Path, policy: ErrorPolicy | None = None) -> dict[str, Document]:
    """Entity documents from JSONL ``{id, name, description}``; duplicate ids and empty names are errors."""
    policy = resolve_policy(policy)
    kb: dict[str, Document] = {}
    for rec in iter_records(path, policy):
        try:
            rec.record_id = str(rec.get("id", (str, int)))
            if not rec.record_id.strip():
                raise rec.error("id", "empty id")
            name = rec.text("name").strip()
            description = rec.get("description", str, required=False, default="").strip()
            if rec.record_id in kb:
                raise rec.error("id", "duplicate entity id")
        except InputError as err:
            policy.handle(err)
            continue
        kb[rec.record_id] = Document(doc_id=rec.record_id, title=name, text=description)
    return kb


def _fallback_kb(names: dict[str, str]) -> dict[str, Document]:
    return {eid: Document(doc_id=eid, title=name or eid, text="") for eid, name in names.items()}


def _mention_notes(examples: list[LinkingExample]) -> list[str]:
    raw = Counter(m.raw_entity_id for ex in examples for m in ex.mentions if m.entity_id == NIL_ID)
    total = sum(len(ex.mentions) for ex in examples)
    detail = ", ".join(f"{k} {v}" for k, v in sorted(raw.items()))
    return [f"{len(examples)} documents, {total} mentions, {sum(raw.values())} NIL" + (f" ({detail})" if detail else "")]


def read_elevant(path: str | Path, policy: ErrorPolicy | None = None, kb_path: str | Path | None = None) -> Dataset:
    """Read an ELEVANT ``*.benchmark.jsonl``; entity documents come from ``kb_path`` or, failing that, the labels."""
    policy = resolve_policy(policy)
    run = RecordPass(policy)
    examples: list[LinkingExample] = []
    names: dict[str, str] = {}
    for example, record_names in run.parse(iter_records(path, policy), parse_elevant_record, lambda p: p[0].example_id,
                                           "id", "duplicate document id (first seen at line {line})"):
        for eid, name in record_names.items():
            if names.setdefault(eid, name) != name:
                run.tally["entity ids labelled with different names (first name kept)"] += 1
        examples.append(example)

    notes = _mention_notes(examples) + run.tally_notes()
    if kb_path is not None:
        documents = read_entity_kb(kb_path, policy)
        missing = sorted(set(names) - set(documents))
        if missing:
            notes.append(f"{len(missing)} gold entity ids are not in the KB {kb_path} (unlinkable; e.g. {missing[:5]})")
    else:
        documents = _fallback_kb(names)
        notes.append(FALLBACK_KB_NOTE)
    notes += run.quarantine_notes()
    return Dataset(task="el", examples=examples, documents=documents, source="elevant", notes=notes)
