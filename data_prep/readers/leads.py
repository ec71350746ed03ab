"""Hop leads: the short text the model writes before each hop's ``[RQ]`` (``tagging.rag.hop_lead``).

A query row's hop reads ``[GEN] lead  [RET] [RQ]  [CTX] <paragraph> … </paragraph>``. Without a lead
of its own the lead is the template's plain ``" Search:"`` for every hop, so the model's hidden state
at ``[RQ]`` has nothing hop-specific to say what it looks for. ``lead_from`` (a ``PrepConfig``
field, so it is part of the prepared config and its fingerprint) picks where leads come from:

- ``title``: each hop's lead is its gold paragraph's title: the entity that hop needs. In HotpotQA
  hop 1's title is (mostly) named in the question and hop 2's is the bridge entity named in hop
  1's paragraph, which the row has just inserted: "Search: Haymo of Faversham" then "Search:
  Recovery of Aristotle". The lead matches the ``title:`` that starts the document row.
- ``file``: the leads the input file itself carries, set by its reader: 2Wiki's evidence triples
  (``readers/twowiki.py``: "Charles James Mathew father"), the OneGen reference format's assistant
  text. A HotpotQA file carries none.
- ``none``: no leads; every hop uses the template's plain lead.
- ``auto`` (default): ``title`` for HotpotQA, ``file`` for every other kind (2Wiki keeps its
  evidence leads; the synthetic world is written in 2Wiki's layout).

``apply_hop_leads`` returns a note for the prep log and the manifest's ``notes``: how many examples
got leads and, for titles, how often hop 1's title is named in the question and hop 2's in hop 1's
paragraph (a check that the supporting facts are in hop order).
"""

from __future__ import annotations

from typing import Literal

from onegen.errors import ConfigError

from ..records import Dataset, MultiHopExample

LeadFrom = Literal["auto", "title", "file", "none"]
LEAD_FROM_HELP = (
    "the text before each hop's [RQ]: title = the hop's gold paragraph title (the entity it needs), "
    "file = the leads the input carries (2Wiki evidence triples), none = the template's plain lead; "
    "auto = title for hotpotqa, file otherwise (data_prep/readers/leads.py)")


def resolve_lead_from(kind: str, lead_from: str) -> str:
    """``auto`` made concrete for ``kind``."""
    if lead_from == "auto":
        return "title" if kind == "hotpotqa" else "file"
    return lead_from


def apply_hop_leads(ds: Dataset, kind: str, lead_from: str) -> str | None:
    """Set (or clear) ``hop_leads`` of every multi-hop example of ``ds``; return the note to report."""
    if ds.task != "rag":
        if lead_from not in ("auto", "none"):
            raise ConfigError(f"lead_from={lead_from}: hop leads are for multi-hop kinds (hotpotqa, 2wiki, onegen), "
                              f"not kind={kind}")
        return None
    source = resolve_lead_from(kind, lead_from)
    examples: list[MultiHopExample] = ds.examples  # type: ignore[assignment]
    if source == "none":
        for ex in examples:
            ex.hop_leads = None
        return f"hop leads: none (lead_from={lead_from}): every hop uses the template's plain lead"
    if source == "file":
        n = sum(1 for ex in examples if ex.hop_leads)
        return (f"hop leads: {n} of {len(examples)} examples have leads from the input file "
                f"(lead_from={lead_from}; the others use the template's plain lead)")
    return _title_leads(ds, examples, lead_from)


def _title_leads(ds: Dataset, examples: list[MultiHopExample], lead_from: str) -> str:
    n = in_question = bridged = two_hop = 0
    for ex in examples:
        if not ex.hops:
            ex.hop_leads = None
            continue
        docs = [ds.documents.get(h) for h in ex.hops]
        ex.hop_leads = [d.title if d is not None else h for d, h in zip(docs, ex.hops)]
        n += 1
        in_question += ex.hop_leads[0].lower() in ex.question.lower()
        if len(ex.hops) > 1 and docs[0] is not None:
            two_hop += 1
            bridged += ex.hop_leads[1].lower() in docs[0].text.lower()
    return (f"hop leads: {n} of {len(examples)} examples got leads from their gold paragraph titles "
            f"(lead_from={lead_from}); hop 1's title is named in the question in {in_question} of {n}, "
            f"hop 2's title in hop 1's paragraph in {bridged} of {two_hop}")
