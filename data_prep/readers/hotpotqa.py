"""HotpotQA (distractor and fullwiki) → ``MultiHopExample`` + a document pool keyed by paragraph title.

Layout: ``_id, answer, question, supporting_facts [[title, sent_id]], context [[title, [sentences]]],
type, level``. A paragraph's doc id is its title and its text is ``"".join(sentences).strip()``
(sentences keep their own leading spaces). ``hops`` are the supporting-fact titles in order of first
appearance; ``context_doc_ids`` are all context titles (gold + distractors).

Fullwiki: ``context`` holds retrieved paragraphs, and the gold paragraph is often absent. With
``require_gold_in_context=True`` (default: retrieval training and Recall@k need every gold
paragraph) such a record is an error; with False (answer EM/F1 on fullwiki) it is kept with the hops
that resolve, the absent titles go to ``extra["missing_gold"]`` and a note counts them.

The parsing core (``parse_multihop_record``, ``build_multihop_dataset``, ``DocumentPool``) is shared
with the 2WikiMultihopQA reader and the hub loader.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..records import Dataset, Document, MultiHopExample
from .errors import ErrorPolicy, RecordPass, resolve_policy
from .jsonio import RawRecord, iter_records


@dataclass
class ParsedMultiHop:
    """One record, fully validated; nothing is pooled until the whole record is known to be good."""

    example: MultiHopExample
    documents: list[Document]
    # note stem -> count, summed over the file into Dataset.notes ("3 <stem>")
    tally: Counter = field(default_factory=Counter)


class DocumentPool:
    """Documents shared across examples by doc id: the first text wins, a differing text is a conflict."""

    def __init__(self) -> None:
        self.documents: dict[str, Document] = {}
        self.conflicts = 0

    def add(self, doc: Document) -> None:
        first = self.documents.setdefault(doc.doc_id, doc)
        if first is not doc and first.text != doc.text:
            self.conflicts += 1


def _paragraphs(rec: RawRecord) -> list[tuple[str, list[str]]]:
    out = []
    for where, item in rec.fixed_lists("context", "[title, [sentences]]", 2):
        title = rec.check(item[0], str, f"{where}[0]")
        sentences = rec.check(item[1], list, f"{where}[1]")
        for j, s in enumerate(sentences):
            rec.check(s, str, f"{where}[1][{j}]")
        if not title.strip():
            raise rec.error(f"{where}[0]", "empty paragraph title")
        if not "".join(sentences).strip():
            raise rec.error(where, f"empty paragraph text (title {title!r})")
        out.append((title, sentences))
    return out


def _supporting_facts(rec: RawRecord) -> list[tuple[str, int]]:
    return [(rec.check(item[0], str, f"{where}[0]"), rec.check(item[1], int, f"{where}[1]"))
            for where, item in rec.fixed_lists("supporting_facts", "[title, sent_id]", 2)]


def parse_multihop_record(rec: RawRecord, *, require_gold_in_context: bool = True) -> ParsedMultiHop:
    """Validate one HotpotQA-layout record (also the core of 2Wiki) into an example and its paragraphs."""
    rec.record_id = rec.get("_id", str)
    if not rec.record_id.strip():
        raise rec.error("_id", "empty _id")
    question = rec.text("question")
    answer = rec.text("answer")
    qtype = rec.get("type", str, required=False, default="")
    level = rec.get("level", str, required=False, default="")
    paragraphs = _paragraphs(rec)
    facts = _supporting_facts(rec)

    tally: Counter = Counter()
    by_title: dict[str, list[str]] = {}
    documents: list[Document] = []
    for title, sentences in paragraphs:
        text = "".join(sentences).strip()
        if title in by_title:
            # 2Wiki repeats some paragraphs verbatim inside one context; a differing text is a conflict
            same = "".join(by_title[title]).strip() == text
            tally["paragraphs repeated verbatim inside one record's context (kept once)" if same else
                  "paragraphs share a title with a different text inside one record (first kept)"] += 1
            continue
        by_title[title] = sentences
        documents.append(Document(doc_id=title, title=title, text=text))

    hops: list[str] = []
    missing: list[str] = []
    for i, (title, sent_id) in enumerate(facts):
        if title not in by_title:
            if require_gold_in_context:
                reason = f"supporting fact points at paragraph {title!r}, which is not in context"
                raise rec.error(f"supporting_facts[{i}][0]", reason)
            if title not in missing:
                missing.append(title)
            continue
        n = len(by_title[title])
        if not 0 <= sent_id < n:
            reason = f"sentence index {sent_id} out of range: paragraph {title!r} has {n} sentences"
            raise rec.error(f"supporting_facts[{i}][1]", reason)
        if title not in hops:
            hops.append(title)
    if not hops:
        tally["examples have no gold paragraph in context at all (no hops)"] += 1
    if missing:
        tally["examples keep only the hops found in context (gold paragraph absent from context: fullwiki setting)"] += 1
        tally["supporting-fact paragraphs absent from context in total"] += len(missing)

    extra = {"level": level, "supporting_facts": [[t, s] for t, s in facts]}
    if missing:
        extra["missing_gold"] = missing
    example = MultiHopExample(
        example_id=rec.record_id,
        question=question.strip(),
        answer=answer.strip(),
        hops=hops,
        context_doc_ids=list(by_title),
        answer_aliases=[answer.strip()],
        qtype=qtype,
        source=str(rec.path),
        line=rec.line,
        extra=extra,
    )
    return ParsedMultiHop(example, documents, tally)


def build_multihop_dataset(
    records: Iterable[RawRecord],
    parse: Callable[[RawRecord], ParsedMultiHop],
    policy: ErrorPolicy,
    source: str,
) -> Dataset:
    """Parse every record, reject duplicates of ``_id``, pool the paragraphs and write the notes."""
    run = RecordPass(policy)
    pool = DocumentPool()
    examples: list[MultiHopExample] = []

    def parse_counted(rec: RawRecord, tally: Counter) -> ParsedMultiHop:
        parsed = parse(rec)
        tally.update(parsed.tally)
        return parsed

    for parsed in run.parse(records, parse_counted, lambda p: p.example.example_id, "_id",
                            "duplicate _id (first seen at {where} {line})"):
        for doc in parsed.documents:
            pool.add(doc)
        examples.append(parsed.example)

    notes = run.tally_notes()
    if pool.conflicts:
        notes.append(
            f"{pool.conflicts} paragraphs share a title with an earlier example's paragraph but differ in text (first kept)"
        )
    notes += run.quarantine_notes()
    return Dataset(task="rag", examples=examples, documents=pool.documents, source=source, notes=notes)


def read_hotpotqa(path: str | Path, policy: ErrorPolicy | None = None, *, require_gold_in_context: bool = True) -> Dataset:
    """Read a HotpotQA file (JSON list or JSONL, optionally gzipped), distractor or fullwiki."""
    policy = resolve_policy(policy)

    def parse(rec: RawRecord) -> ParsedMultiHop:
        return parse_multihop_record(rec, require_gold_in_context=require_gold_in_context)

    return build_multihop_dataset(iter_records(path, policy), parse, policy, source="hotpotqa")
