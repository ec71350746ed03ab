"""The zjunlp/OneGen released training format (``train.jsonl`` + ``db.jsonl``) → ``MultiHopExample``.

No sample of these files is public, so the parser follows the reference code (``AutoDataset`` and
``DocumentTemplator`` in zjunlp/OneGen) and accepts the plausible variants:

- ``db.jsonl``: one document per line; id from the first of ``uid``/``id``/``doc_id``/``_id``; text
  from ``text``/``content``/``contents``, else the concatenated ``messages[*].content`` (the
  reference keeps documents as chat messages); optional ``title``. Retrieval tokens are stripped
  from the text (the reference appends its document token to every fragment).
- ``train.jsonl``: ``messages`` (``[{role, content}, ...]``; the reference alternates user and
  assistant turns, with retrieved documents inside ``<paragraph>…</paragraph>``). question = the
  first user message; answer = the final assistant message after its last ``</paragraph>``; hop
  *i* = the positive of the *i*-th query token: explicit ``positive``/``positives`` (on the record or,
  as in the reference, per assistant message, one entry per query token, a list meaning several
  positives of which the first is the hop), else the db document whose text equals the *i*-th
  inserted paragraph (compared after stripping tokens and collapsing whitespace). Reference ids of
  the form ``<doc>-<fragment>`` resolve to ``<doc>`` (one ``[RD]`` per document here).
  ``negative``/``negatives`` (per query token, lists of ids) are kept in ``extra["negatives"]``
  (provenance ``given``) and also become context doc ids.
- ``hop_leads``: the assistant text written before each query token, when every such text is non-empty.

Query tokens default to ours and the reference's (``[RQ]``, ``[Question Representation]``).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onegen.errors import InputError

from ..records import Dataset, Document, MultiHopExample
from .errors import ErrorPolicy, RecordPass, resolve_policy
from .jsonio import RawRecord, iter_records

DB_ID_FIELDS = ("uid", "id", "doc_id", "_id")
DB_TEXT_FIELDS = ("text", "content", "contents")
EXAMPLE_ID_FIELDS = ("id", "_id", "example_id", "uid")


@dataclass
class OneGenRefFormat:
    query_tokens: tuple[str, ...] = field(
        default=("[RQ]", "[Question Representation]"), metadata={"help": "tokens whose state is a query (one per hop)"}
    )
    doc_tokens: tuple[str, ...] = field(
        default=("[RD]", "[Document Fragment Representation]"), metadata={"help": "document tokens, stripped from texts"}
    )
    para_open: str = field(default="<paragraph>", metadata={"help": "opens an inserted document"})
    para_close: str = field(default="</paragraph>", metadata={"help": "closes an inserted document"})

    def strip_tokens(self, text: str) -> str:
        for tok in (*self.query_tokens, *self.doc_tokens, self.para_open, self.para_close):
            text = text.replace(tok, " ")
        return " ".join(text.split())

    def paragraph_re(self) -> re.Pattern:
        return re.compile(re.escape(self.para_open) + r"(.*?)" + re.escape(self.para_close), re.DOTALL)

    def query_re(self) -> re.Pattern:
        return re.compile("|".join(re.escape(t) for t in self.query_tokens))


@dataclass
class RefDb:
    documents: dict[str, Document]
    by_text: dict[str, str]  # normalised text -> first doc id with that text
    shared_texts: int = 0  # documents whose text equals an earlier one's (paragraph matching picks the first)


def _first_field(rec: RawRecord, names: tuple[str, ...]) -> str | None:
    return next((n for n in names if n in rec.data), None)


def _db_text(rec: RawRecord) -> str:
    name = _first_field(rec, DB_TEXT_FIELDS)
    if name is not None:
        return rec.get(name, str)
    if "messages" in rec.data:
        return "".join(m["content"] for m in _messages(rec))
    raise rec.error("text", f"missing field (looked for {', '.join(DB_TEXT_FIELDS)} and messages)")


def read_reference_db(path: str | Path, policy: ErrorPolicy | None = None, fmt: OneGenRefFormat | None = None) -> RefDb:
    policy, fmt = resolve_policy(policy), fmt or OneGenRefFormat()
    db = RefDb(documents={}, by_text={})
    for rec in iter_records(path, policy):
        try:
            id_field = _first_field(rec, DB_ID_FIELDS)
            if id_field is None:
                raise rec.error("id", f"missing field (looked for {', '.join(DB_ID_FIELDS)})")
            rec.record_id = str(rec.get(id_field, (str, int)))
            text = fmt.strip_tokens(_db_text(rec))
            if not text:
                raise rec.error(_first_field(rec, DB_TEXT_FIELDS) or "messages", "empty text")
            title = rec.get("title", str, required=False, default="").strip()
            if rec.record_id in db.documents:
                raise rec.error(id_field, "duplicate document id")
        except InputError as err:
            policy.handle(err)
            continue
        db.documents[rec.record_id] = Document(doc_id=rec.record_id, title=title, text=text)
        if db.by_text.setdefault(text, rec.record_id) != rec.record_id:
            db.shared_texts += 1
    return db


def _messages(rec: RawRecord) -> list[dict[str, Any]]:
    messages = rec.get("messages", list)
    if not messages:
        raise rec.error("messages", "empty list")
    for i, m in enumerate(messages):
        rec.check(m, dict, f"messages[{i}]")
        for key in ("role", "content"):
            if key not in m:
                raise rec.error(f"messages[{i}].{key}", "missing field")
            rec.check(m[key], str, f"messages[{i}].{key}")
    return messages


def _resolve_id(rec: RawRecord, value: Any, field: str, db: RefDb, tally: Counter) -> str:
    doc_id = str(rec.check(value, (str, int), field))
    if doc_id in db.documents:
        return doc_id
    head, _, frag = doc_id.rpartition("-")
    if frag.isdigit() and head in db.documents:
        tally["fragment-level ids (<doc>-<n>) resolved to their document"] += 1
        return head
    raise rec.error(field, f"doc id {doc_id!r} not found in db.jsonl")


def _given_lists(rec: RawRecord, messages: list[dict], names: tuple[str, str]) -> tuple[list[Any], list[str]] | None:
    """Per-query-token entries of ``positive(s)``/``negative(s)`` from the record or its assistant messages."""
    for name in names:
        if name in rec.data:
            items = rec.get(name, list)
            return items, [f"{name}[{i}]" for i in range(len(items))]
    items, fields = [], []
    for i, m in enumerate(messages):
        for name in names:
            if m["role"] == "assistant" and name in m:
                entries = rec.check(m[name], list, f"messages[{i}].{name}")
                items += entries
                fields += [f"messages[{i}].{name}[{j}]" for j in range(len(entries))]
    return (items, fields) if fields else None


def _hops_from_positives(rec, given, db, tally) -> list[str]:
    hops = []
    for entry, field in zip(*given):
        first = entry[0] if isinstance(entry, list) and entry else entry
        hops.append(_resolve_id(rec, first, f"{field}[0]" if isinstance(entry, list) else field, db, tally))
    return hops


def _hops_from_paragraphs(rec, messages, fmt, db) -> list[str]:
    hops = []
    pattern = fmt.paragraph_re()
    for i, m in enumerate(messages):
        for para in pattern.findall(m["content"]):
            doc_id = db.by_text.get(fmt.strip_tokens(para))
            if doc_id is None:
                raise rec.error(f"messages[{i}].content", f"paragraph not found in db.jsonl: {fmt.strip_tokens(para)[:60]!r}")
            hops.append(doc_id)
    return hops


def _hop_leads(messages: list[dict], fmt: OneGenRefFormat) -> list[str]:
    leads = []
    query = fmt.query_re()
    for m in messages:
        if m["role"] != "assistant":
            continue
        cursor = 0
        for hit in query.finditer(m["content"]):
            before = m["content"][cursor : hit.start()]
            before = before.rsplit(fmt.para_close, 1)[-1]
            leads.append(fmt.strip_tokens(before))
            cursor = hit.end()
    return leads


def _answer(rec: RawRecord, messages: list[dict], fmt: OneGenRefFormat) -> str:
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise rec.error("messages", "no assistant message")
    answer = fmt.strip_tokens(messages[last]["content"].rsplit(fmt.para_close, 1)[-1])
    if not answer:
        raise rec.error(f"messages[{last}].content", "empty answer after the last paragraph")
    return answer


def parse_reference_record(rec: RawRecord, db: RefDb, fmt: OneGenRefFormat, tally: Counter) -> MultiHopExample:
    id_field = _first_field(rec, EXAMPLE_ID_FIELDS)
    rec.record_id = str(rec.get(id_field, (str, int))) if id_field else f"{Path(rec.path).name}:{rec.line}"
    messages = _messages(rec)
    user = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
    if user is None:
        raise rec.error("messages", "no user message (the question)")
    question = fmt.strip_tokens(messages[user]["content"])
    if not question:
        raise rec.error(f"messages[{user}].content", "empty question")
    answer = _answer(rec, messages, fmt)
    n_queries = sum(len(fmt.query_re().findall(m["content"])) for m in messages if m["role"] == "assistant")

    positives = _given_lists(rec, messages, ("positives", "positive"))
    if positives is not None:
        hops, what = _hops_from_positives(rec, positives, db, tally), "positives"
    else:
        hops, what = _hops_from_paragraphs(rec, messages, fmt, db), "inserted paragraphs"
    if n_queries and len(hops) != n_queries:
        raise rec.error("messages", f"{n_queries} query tokens but {len(hops)} {what}")

    negatives: list[list[str]] = []
    given_neg = _given_lists(rec, messages, ("negatives", "negative"))
    for entry, field in zip(*given_neg) if given_neg else ():
        rec.check(entry, list, field)
        negatives.append([_resolve_id(rec, v, f"{field}[{j}]", db, tally) for j, v in enumerate(entry)])

    leads = _hop_leads(messages, fmt)
    extra: dict[str, Any] = {"hop_source": what}
    if negatives:
        extra["negatives"], extra["neg_source"] = negatives, "given"
    return MultiHopExample(
        example_id=rec.record_id,
        question=question,
        answer=answer,
        hops=hops,
        context_doc_ids=list(dict.fromkeys([*hops, *(d for negs in negatives for d in negs)])),
        answer_aliases=[answer],
        hop_leads=leads if len(leads) == len(hops) and hops and all(leads) else None,
        source=str(rec.path),
        line=rec.line,
        extra=extra,
    )


def read_onegen_reference(
    train_path: str | Path,
    db_path: str | Path,
    policy: ErrorPolicy | None = None,
    fmt: OneGenRefFormat | None = None,
) -> Dataset:
    """Read OneGen's released ``train.jsonl`` against its ``db.jsonl``."""
    policy, fmt = resolve_policy(policy), fmt or OneGenRefFormat()
    run = RecordPass(policy)  # the db's quarantined records count in its note too
    db = read_reference_db(db_path, policy, fmt)

    def parse(rec: RawRecord, tally: Counter) -> MultiHopExample:
        return parse_reference_record(rec, db, fmt, tally)

    examples = list(run.parse(iter_records(train_path, policy), parse, lambda ex: ex.example_id, "id",
                              "duplicate example id (first seen at line {line})"))
    notes = run.tally_notes()
    if db.shared_texts:
        notes.append(f"{db.shared_texts} db documents repeat an earlier document's text (paragraph matching picks the first id)")
    notes += run.quarantine_notes()
    return Dataset(task="rag", examples=examples, documents=db.documents, source="onegen", notes=notes)
