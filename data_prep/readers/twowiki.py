"""2WikiMultihopQA → ``MultiHopExample``; its passage corpus → documents for the open setting.

The layout is HotpotQA's (see ``hotpotqa``) plus ``entity_ids``, ``evidences [[subj, rel, obj]]``,
``evidences_id`` and ``answer_id``; the shared core validates the common part.

Hop leads: when a record has exactly one evidence triple per hop, evidence *i* describes hop *i*
(true of every type in the dev set: compositional, inference, comparison, bridge_comparison), so
the text the model writes before hop *i*'s ``[RQ]`` is ``f"{subject} {relation}"`` — e.g.
"Charles James Mathew father" then "Sir James Charles Mathew place of burial". Otherwise
(a few comparison records carry extra evidences) ``hop_leads`` is None, the template's default
lead is used, and a note counts those records.

Answer aliases: the official 2Wiki ``id_aliases.json`` (JSON Lines of ``{"Q_id", "aliases",
"demonyms"}``) keyed by ``answer_id``; like the official evaluation script, aliases and demonyms
both count. ``answer_aliases = [answer] + aliases + demonyms`` without repeats.
"""

from __future__ import annotations

from pathlib import Path

from onegen.errors import InputError

from ..records import Dataset, Document
from .errors import ErrorPolicy, resolve_policy
from .hotpotqa import ParsedMultiHop, build_multihop_dataset, parse_multihop_record
from .jsonio import RawRecord, iter_records

NO_LEADS_NOTE = "examples have a number of evidences different from their hops: hop_leads left to the template default"
ALIASED_NOTE = "examples got answer aliases from the aliases file"


def read_answer_aliases(path: str | Path, policy: ErrorPolicy | None = None) -> dict[str, list[str]]:
    """``{Q_id: aliases + demonyms}`` from the official 2Wiki ``id_aliases.json`` (JSON Lines)."""
    policy = resolve_policy(policy)
    out: dict[str, list[str]] = {}
    for rec in iter_records(path, policy):
        try:
            qid = rec.text("Q_id")
            rec.record_id = qid
            names = []
            for key in ("aliases", "demonyms"):
                for i, name in enumerate(rec.get(key, list, required=False, default=[])):
                    names.append(rec.check(name, str, f"{key}[{i}]"))
            if qid in out:
                raise rec.error("Q_id", "duplicate Q_id")
        except InputError as err:
            policy.handle(err)
            continue
        out[qid] = names
    return out


def _evidences(rec: RawRecord) -> list[list[str]]:
    evidences = []
    for where, triple in rec.fixed_lists("evidences", "[subject, relation, object]", 3):
        for j, part in enumerate(triple):
            rec.check(part, str, f"{where}[{j}]")
        evidences.append(triple)
    return evidences


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(s.strip() for s in items if s.strip()))


def parse_twowiki_record(
    rec: RawRecord, aliases: dict[str, list[str]] | None, *, require_gold_in_context: bool = True
) -> ParsedMultiHop:
    """The HotpotQA core plus 2Wiki's evidences (hop leads), entity ids and answer aliases."""
    parsed = parse_multihop_record(rec, require_gold_in_context=require_gold_in_context)
    ex = parsed.example
    entity_ids = rec.get("entity_ids", str)
    evidences = _evidences(rec)
    answer_id = rec.get("answer_id", (str, type(None)))
    evidences_id = rec.get("evidences_id", list, required=False, default=[])

    if len(evidences) == len(ex.hops) and ex.hops:
        ex.hop_leads = [f"{subj} {rel}" for subj, rel, _ in evidences]
    else:
        parsed.tally[NO_LEADS_NOTE] += 1
    if aliases is not None and answer_id in aliases:
        ex.answer_aliases = _unique([ex.answer, *aliases[answer_id]])
        parsed.tally[ALIASED_NOTE] += 1
    ex.extra.update(entity_ids=entity_ids, evidences=evidences, evidences_id=evidences_id, answer_id=answer_id)
    return parsed


def read_twowiki(
    path: str | Path,
    policy: ErrorPolicy | None = None,
    aliases_path: str | Path | None = None,
    *,
    require_gold_in_context: bool = True,
) -> Dataset:
    """Read a 2WikiMultihopQA file (JSON list or JSONL, optionally gzipped)."""
    policy = resolve_policy(policy)
    aliases = read_answer_aliases(aliases_path, policy) if aliases_path is not None else None

    def parse(rec: RawRecord) -> ParsedMultiHop:
        return parse_twowiki_record(rec, aliases, require_gold_in_context=require_gold_in_context)

    dataset = build_multihop_dataset(iter_records(path, policy), parse, policy, source="2wiki")
    if aliases is None:
        dataset.notes.append("no answer-aliases file given: EM/F1 compare against the answer string only")
    return dataset


def read_passage_corpus(path: str | Path, policy: ErrorPolicy | None = None) -> dict[str, Document]:
    """A passage corpus (e.g. HippoRAG's ``2wikimultihopqa_corpus.json``: a list of ``{title, text}``).

    doc_id = title, as for the context paragraphs, so gold hops resolve against it. A title repeated
    with the same text is kept once; with a different text it is an error (the doc id would be ambiguous).
    """
    policy = resolve_policy(policy)
    docs: dict[str, Document] = {}
    for rec in iter_records(path, policy):
        try:
            title = rec.text("title")
            rec.record_id = title
            text = rec.text("text").strip()
            first = docs.get(title)
            if first is not None and first.text != text:
                raise rec.error("title", "duplicate title with a different text")
        except InputError as err:
            policy.handle(err)
            continue
        docs.setdefault(title, Document(doc_id=title, title=title, text=text))
    return docs
