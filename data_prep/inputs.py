"""What ``prepare`` reads: the benchmark (file or hub), the extra corpus, and which examples to keep.

``read_inputs`` runs, in this order: the reader (``data_prep.readers``), the open-setting corpus
(``--corpus``), the held-out split (``holdout.*``, ``data_prep.holdout``: by question / text id),
``--max-examples``, the hop leads (``lead_from``, ``data_prep.readers.leads``) and, for entity
linking, the split of long texts into passages (after the held-out split: a text's passages stay on
one side).
"""

from __future__ import annotations

from typing import Any

from data_prep import holdout
from data_prep.readers import read_benchmark
from data_prep.readers.hub import load_from_hub
from data_prep.readers.jsonio import check_input_file
from data_prep.readers.leads import apply_hop_leads
from data_prep.readers.twowiki import read_passage_corpus
from data_prep.records import Dataset, MultiHopExample
from data_prep.tagging import split_long_text
from onegen.errors import ConfigError
from onegen.manifest import sha256_file


def _reader_kwargs(cfg) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    if cfg.kind in ("hotpotqa", "2wiki"):
        kw["require_gold_in_context"] = cfg.require_gold_in_context
    if cfg.kind == "2wiki" and cfg.aliases:
        kw["aliases_path"] = cfg.aliases
    if cfg.kind == "elevant" and cfg.kb:
        kw["kb_path"] = cfg.kb
    if cfg.kind == "onegen":
        if not cfg.db:
            raise ConfigError("kind=onegen needs --db db.jsonl")
        kw["db_path"] = cfg.db
    return kw


def read_inputs(cfg, policy) -> Dataset:
    """``cfg``: a ``data_prep.prepare.PrepConfig``."""
    if cfg.from_hub:
        ds = load_from_hub(cfg.from_hub, cfg.split, cache_dir=None, allow_network=cfg.allow_network)
    else:
        if not cfg.input:
            raise ConfigError("no input: give --input FILE (or --from-hub NAME --allow-network)")
        ds = read_benchmark(cfg.kind, cfg.input, policy, **_reader_kwargs(cfg))
    if cfg.corpus:
        for doc_id, doc in read_passage_corpus(cfg.corpus).items():
            ds.documents.setdefault(doc_id, doc)
    # bpe:N trained on both parts: a model trained on part=train must read part=heldout's ids.
    shared_texts = corpus_texts(ds) if cfg.holdout.part != "all" and cfg.tokenizer.startswith("bpe:") else None
    ds.examples, dropped = holdout.select(ds.examples, cfg.holdout)
    in_part = len(ds.examples)
    if cfg.max_examples is not None:
        ds.examples = ds.examples[: cfg.max_examples]
    ids = [ex.example_id for ex in ds.examples]
    ds.selection = dict(holdout.record(cfg.holdout, ids, dropped, in_part - len(ids)), ids=ids)
    if shared_texts is not None:
        ds.selection["tokenizer_texts"] = shared_texts
    note = apply_hop_leads(ds, cfg.kind, cfg.lead_from)
    if note:
        ds.notes.append(note)
    if ds.task == "el":
        ds.examples = [p for ex in ds.examples for p in split_long_text(ex, cfg.el_max_chars)]
    return ds


def input_fingerprints(cfg) -> list[dict]:
    out = []
    for key in ("input", "kb", "db", "aliases", "corpus"):
        p = getattr(cfg, key)
        if p:
            check_input_file(p, f"--{key}")  # missing, or a directory (with the JSON files inside it)
            out.append({"role": key, "path": str(p), "sha256": sha256_file(p)})
    return out


def corpus_texts(ds: Dataset) -> list[str]:
    """Every text the model will read, for training a BPE (sorted: the result must not depend on order)."""
    texts = [f"{d.title}: {d.text}" for d in ds.documents.values()]
    for ex in ds.examples:
        texts.append(ex.question + " " + ex.answer if isinstance(ex, MultiHopExample) else ex.text)
    return sorted(texts)
