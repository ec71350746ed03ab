"""Benchmark readers: the real samples in ../shared/data, and every class of bad input."""

from __future__ import annotations

import copy
import gzip
import json
from collections import Counter
from pathlib import Path

import pytest

from conftest import shared_file
from data_prep.readers import ErrorPolicy, read_benchmark
from data_prep.readers.elevant import FALLBACK_KB_NOTE, read_elevant, read_entity_kb
from data_prep.readers.hotpotqa import read_hotpotqa
from data_prep.readers.hub import NetworkRefused, dataset_from_rows, load_from_hub
from data_prep.readers.jsonio import iter_records
from data_prep.readers.onegen_ref import read_onegen_reference
from data_prep.readers.twowiki import read_passage_corpus, read_twowiki
from data_prep.records import NIL_ID
from onegen.errors import InputError

HOTPOT_DISTRACTOR = "hotpotqa/hipporag_hotpot_train_distractor100.json"
HOTPOT_FULLWIKI = "hotpotqa/amor_hotpot_dev_fullwiki_test500.jsonl.gz"
TWOWIKI_SAMPLE = "2wikimultihopqa/2wiki_dev_sample500.json.gz"
TWOWIKI_KAG = "2wikimultihopqa/kag_2wiki_dev_qa_sub2.json"
TWOWIKI_CORPUS = "2wikimultihopqa/hipporag_2wiki_dev1000_corpus.json.gz"
ELEVANT = "entity_linking/elevant/{}.benchmark.jsonl"


def load_raw(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        text = f.read()
    return json.loads(text) if text.lstrip().startswith("[") else [json.loads(l) for l in text.splitlines() if l.strip()]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def first_appearance(facts: list) -> list[str]:
    return list(dict.fromkeys(t for t, _ in facts))


# ---------------------------------------------------------------------------------------------
# HotpotQA
# ---------------------------------------------------------------------------------------------


@pytest.mark.shared_data
def test_hotpotqa_distractor_sample():
    path = shared_file(HOTPOT_DISTRACTOR)
    raw = load_raw(path)
    ds = read_hotpotqa(path)
    assert ds.task == "rag" and len(ds.examples) == len(raw) == 100
    texts = {t: "".join(s).strip() for r in raw for t, s in r["context"]}
    assert set(ds.documents) == set(texts)
    assert all(ds.documents[t].text == texts[t] and ds.documents[t].title == t for t in texts)
    for ex, r in zip(ds.examples, raw):
        assert ex.example_id == r["_id"] and ex.answer == r["answer"].strip()
        assert ex.hops == first_appearance(r["supporting_facts"])
        assert ex.context_doc_ids == [t for t, _ in r["context"]]
        assert set(ex.hops) <= set(ex.context_doc_ids)
        assert ex.answer_aliases[0] == ex.answer and ex.extra["level"] == r["level"]
    assert Counter(ex.extra["level"] for ex in ds.examples) == {"easy": 16, "medium": 69, "hard": 15}


@pytest.mark.shared_data
def test_hotpotqa_fullwiki_skip_quarantines_records_without_gold(tmp_path):
    path = shared_file(HOTPOT_FULLWIKI)
    raw = load_raw(path)
    complete = [r for r in raw if all(t in {c[0] for c in r["context"]} for t, _ in r["supporting_facts"])]
    policy = ErrorPolicy("skip")
    ds = read_hotpotqa(path, policy)
    assert len(ds.examples) == len(complete) == 151  # the README: gold present for 151 of 500
    assert policy.count == len(raw) - len(complete) == 349
    assert any(n.startswith("349 records quarantined") for n in ds.notes)
    assert all(e.field.startswith("supporting_facts[") and "not in context" in e.reason for e in policy.quarantined)
    lines = policy.write(tmp_path / "q.jsonl").read_text().splitlines()
    assert len(lines) == 349 and all(json.loads(l)["reason"] for l in lines)


@pytest.mark.shared_data
def test_hotpotqa_fullwiki_keeps_partial_hops_when_gold_not_required():
    path = shared_file(HOTPOT_FULLWIKI)
    raw = load_raw(path)
    ds = read_hotpotqa(path, require_gold_in_context=False)
    assert len(ds.examples) == len(raw)
    partial = 0
    for ex, r in zip(ds.examples, raw):
        titles = {c[0] for c in r["context"]}
        wanted = first_appearance(r["supporting_facts"])
        assert ex.hops == [t for t in wanted if t in titles]
        assert ex.extra.get("missing_gold", []) == [t for t in wanted if t not in titles]
        partial += bool(ex.extra.get("missing_gold"))
    assert partial == 349
    assert any(n.startswith(f"{partial} examples keep only the hops") for n in ds.notes)


@pytest.mark.shared_data
def test_gzip_and_json_list_and_jsonl_read_alike(tmp_path):
    raw = load_raw(shared_file(HOTPOT_DISTRACTOR))[:5]
    listed = tmp_path / "a.json"
    listed.write_text(json.dumps(raw))
    gz = tmp_path / "b.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.write("\n".join(json.dumps(r) for r in raw) + "\n")
    a, b = read_hotpotqa(listed), read_hotpotqa(gz)
    assert [e.hops for e in a.examples] == [e.hops for e in b.examples]
    assert [e.line for e in a.examples] == [e.line for e in b.examples] == [1, 2, 3, 4, 5]
    assert [r.where for r in iter_records(listed)] == ["record"] * 5


def good_hotpot(i: int = 0) -> dict:
    return {
        "_id": f"q{i}",
        "answer": "Paris",
        "question": "Where is the Eiffel Tower?",
        "supporting_facts": [["Eiffel Tower", 1], ["Paris", 0]],
        "context": [
            ["Eiffel Tower", ["The Eiffel Tower is a tower.", " It is in Paris."]],
            ["Paris", ["Paris is the capital of France."]],
            ["Berlin", ["Berlin is in Germany."]],
        ],
        "type": "bridge",
        "level": "easy",
    }


def _drop(key):
    return lambda r: r.pop(key)


def _set(key, value):
    return lambda r: r.__setitem__(key, value)


BAD_HOTPOT = {
    "missing field": (_drop("question"), "question", "missing field"),
    "wrong type": (_set("answer", 42), "answer", "expected string"),
    "wrong type nested": (lambda r: r["context"][1].__setitem__(1, "not a list"), "context[1][1]", "expected list"),
    "supporting fact without paragraph": (
        lambda r: r["supporting_facts"].append(["Rome", 0]), "supporting_facts[2][0]", "not in context"),
    "sentence index out of range": (
        lambda r: r["supporting_facts"][0].__setitem__(1, 2), "supporting_facts[0][1]", "out of range"),
    "empty question": (_set("question", "  "), "question", "empty text"),
    "empty answer": (_set("answer", ""), "answer", "empty text"),
    "empty paragraph": (lambda r: r["context"][2].__setitem__(1, [" ", ""]), "context[2]", "empty paragraph text"),
}


@pytest.mark.parametrize("case", sorted(BAD_HOTPOT))
def test_hotpotqa_bad_record_names_file_line_field(tmp_path, case):
    mutate, field, reason = BAD_HOTPOT[case]
    bad = good_hotpot(1)
    mutate(bad)
    path = write_jsonl(tmp_path / "bad.jsonl", [good_hotpot(0), bad])
    with pytest.raises(InputError) as info:
        read_hotpotqa(path)
    err = info.value
    assert (err.line, err.field, Path(err.path)) == (2, field, path)
    assert reason in err.reason
    assert f"{path}:2" in str(err) and repr(field) in str(err)


def test_hotpotqa_duplicate_id(tmp_path):
    path = write_jsonl(tmp_path / "dup.jsonl", [good_hotpot(0), good_hotpot(1), good_hotpot(0)])
    with pytest.raises(InputError) as info:
        read_hotpotqa(path)
    assert (info.value.line, info.value.field, info.value.record_id) == (3, "_id", "q0")
    assert "first seen at line 1" in str(info.value)


def test_malformed_json_line_and_list(tmp_path):
    path = write_jsonl(tmp_path / "broken.jsonl", [good_hotpot(0), '{"_id": "q1", "answer": ', good_hotpot(2)])
    with pytest.raises(InputError) as info:
        read_hotpotqa(path)
    assert info.value.line == 2 and "malformed JSON" in str(info.value) and str(path) in str(info.value)

    listed = tmp_path / "broken.json"
    listed.write_text('[\n{"_id": "q0"},\n{"_id": }\n]')
    with pytest.raises(InputError) as info:
        read_hotpotqa(listed)
    assert info.value.line == 3 and "malformed JSON" in info.value.reason


def test_json_list_record_error_says_record(tmp_path):
    bad = good_hotpot(1)
    del bad["answer"]
    path = tmp_path / "list.json"
    path.write_text(json.dumps([good_hotpot(0), bad]))
    with pytest.raises(InputError) as info:
        read_hotpotqa(path)
    assert info.value.where == "record" and "(record 2)" in str(info.value)


def test_skip_policy_three_good_two_bad(tmp_path):
    bad_type = good_hotpot(3)
    bad_type["question"] = ["not", "a", "string"]
    rows = [good_hotpot(0), "{not json", good_hotpot(1), bad_type, good_hotpot(2)]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    policy = ErrorPolicy("skip")
    ds = read_hotpotqa(path, policy)
    assert [e.example_id for e in ds.examples] == ["q0", "q1", "q2"]
    assert policy.count == 2
    out = [json.loads(l) for l in policy.write(tmp_path / "quarantine.jsonl").read_text().splitlines()]
    assert [(q["line"], q["field"]) for q in out] == [(2, None), (4, "question")]
    assert all(q["reason"] and q["path"] == str(path) for q in out)


def test_title_conflicts_across_examples_are_counted(tmp_path):
    other = good_hotpot(1)
    other["context"][2][1] = ["Berlin is the capital of Germany."]
    ds = read_hotpotqa(write_jsonl(tmp_path / "c.jsonl", [good_hotpot(0), other]))
    assert ds.documents["Berlin"].text == "Berlin is in Germany."
    assert any(n.startswith("1 paragraphs share a title") for n in ds.notes)


def test_error_policy_rejects_unknown_mode():
    with pytest.raises(ValueError, match="fail"):
        ErrorPolicy("ignore")


# ---------------------------------------------------------------------------------------------
# 2WikiMultihopQA
# ---------------------------------------------------------------------------------------------


@pytest.mark.shared_data
def test_twowiki_dev_sample():
    path = shared_file(TWOWIKI_SAMPLE)
    raw = load_raw(path)
    ds = read_twowiki(path)
    assert len(ds.examples) == len(raw) == 500
    assert Counter(e.qtype for e in ds.examples) == {
        "compositional": 202, "bridge_comparison": 130, "comparison": 104, "inference": 64}
    assert sum(e.extra["answer_id"] is None for e in ds.examples) == 67
    with_leads = 0
    for ex, r in zip(ds.examples, raw):
        assert ex.hops == first_appearance(r["supporting_facts"])
        assert ex.context_doc_ids == list(dict.fromkeys(t for t, _ in r["context"]))
        if len(r["evidences"]) == len(ex.hops):
            assert ex.hop_leads == [f"{s} {rel}" for s, rel, _ in r["evidences"]]
            with_leads += 1
        else:
            assert ex.hop_leads is None
    assert any(n.startswith(f"{500 - with_leads} examples have a number of evidences") for n in ds.notes)
    first = ds.examples[0]
    assert first.hop_leads == ["Charles James Mathew father", "Sir James Charles Mathew place of burial"]


@pytest.mark.shared_data
def test_twowiki_answer_aliases(tmp_path):
    path = shared_file(TWOWIKI_SAMPLE)
    raw = load_raw(path)
    qid = raw[0]["answer_id"]
    aliases = write_jsonl(tmp_path / "id_aliases.json", [
        {"Q_id": qid, "aliases": ["Cork City", raw[0]["answer"]], "demonyms": ["Corkonian"]},
        {"Q_id": "Q1", "aliases": ["x"], "demonyms": []},
    ])
    ds = read_twowiki(path, aliases_path=aliases)
    assert ds.examples[0].answer_aliases == [raw[0]["answer"], "Cork City", "Corkonian"]
    with_alias = [e for e in ds.examples if e.extra["answer_id"] == qid]
    assert any(n.startswith(f"{len(with_alias)} examples got answer aliases") for n in ds.notes)
    assert all(e.answer_aliases == [e.answer] for e in ds.examples if e.extra["answer_id"] != qid)


@pytest.mark.shared_data
def test_twowiki_kag_questions_resolve_in_corpus():
    ds = read_twowiki(shared_file(TWOWIKI_KAG))
    corpus = read_passage_corpus(shared_file(TWOWIKI_CORPUS))
    assert len(ds.examples) == 2 and len(corpus) == len(load_raw(shared_file(TWOWIKI_CORPUS)))
    assert ds.examples[0].question == "When did Lothair Ii's mother die?"
    for ex in ds.examples:
        assert ex.hops and all(h in corpus for h in ex.hops)
    assert corpus["Teutberga"].text.startswith("Teutberga( died 11 November 875)")


def test_twowiki_bad_evidence_and_corpus_duplicates(tmp_path):
    rec = good_hotpot(0) | {"entity_ids": "Q1_Q2", "evidences": [["Eiffel Tower", "located in"]], "answer_id": "Q90"}
    with pytest.raises(InputError) as info:
        read_twowiki(write_jsonl(tmp_path / "w.jsonl", [rec]))
    assert (info.value.line, info.value.field) == (1, "evidences[0]")
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"title": "A", "text": "x"}, {"title": "A", "text": "y"}])
    with pytest.raises(InputError) as info:
        read_passage_corpus(corpus)
    assert (info.value.line, info.value.field) == (2, "title")


# ---------------------------------------------------------------------------------------------
# ELEVANT entity linking
# ---------------------------------------------------------------------------------------------


@pytest.mark.shared_data
@pytest.mark.parametrize(
    "name, docs, mentions, nil",
    [("kore50", 50, 144, {"<NO_MAPPING>": 1}), ("oke-2015-eval", 101, 664, {"<NIL>": 128}),
     ("reuters-128", 128, 880, {"<NIL>": 229, "<NO_MAPPING>": 28})],
)
def test_elevant_samples_match_readme(name, docs, mentions, nil):
    path = shared_file(ELEVANT.format(name))
    ds = read_elevant(path)
    assert ds.task == "el" and len(ds.examples) == docs
    all_mentions = [m for ex in ds.examples for m in ex.mentions]
    assert len(all_mentions) == mentions
    assert Counter(m.raw_entity_id for m in all_mentions if m.entity_id == NIL_ID) == nil
    for ex in ds.examples:
        assert [m.start for m in ex.mentions] == sorted(m.start for m in ex.mentions)
        assert all(ex.text[m.start:m.end] == m.surface and m.start < m.end for m in ex.mentions)
    linked = {m.entity_id for m in all_mentions if m.entity_id != NIL_ID}
    assert set(ds.documents) == linked and NIL_ID not in ds.documents
    assert all(d.text == "" and d.title for d in ds.documents.values())
    assert FALLBACK_KB_NOTE in ds.notes


@pytest.mark.shared_data
def test_elevant_fallback_titles_are_label_names():
    path = shared_file(ELEVANT.format("kore50"))
    ds = read_elevant(path)
    first_label = load_raw(path)[0]["labels"][0]
    assert ds.documents[first_label["entity_id"]].title == first_label["name"]


def el_doc(i: int, labels=None, text="Steve Jobs founded Apple.") -> dict:
    labels = labels if labels is not None else [
        {"id": 0, "span": [19, 24], "entity_id": "Q312", "name": "Apple"},
        {"id": 1, "span": [0, 10], "entity_id": "Q19837", "name": "Steve Jobs"},
    ]
    return {"id": i, "title": "t", "text": text, "evaluation_span": [0, len(text)], "labels": labels}


BAD_EL = {
    "span outside text": (el_doc(1, [{"span": [19, 40], "entity_id": "Q312"}]), "labels[0].span", "outside the text"),
    "start >= end": (el_doc(1, [{"span": [5, 5], "entity_id": "Q312"}]), "labels[0].span", "start 5 >= end 5"),
    "empty text": (el_doc(1, [], text="  "), "text", "empty text"),
    "duplicate id": (el_doc(0), "id", "duplicate document id"),
    "missing entity id": (el_doc(1, [{"span": [0, 5]}]), "labels[0].entity_id", "missing field"),
}


@pytest.mark.parametrize("case", sorted(BAD_EL))
def test_elevant_bad_record(tmp_path, case):
    bad, field, reason = BAD_EL[case]
    path = write_jsonl(tmp_path / "el.jsonl", [el_doc(0), bad])
    with pytest.raises(InputError) as info:
        read_elevant(path)
    assert (info.value.line, info.value.field) == (2, field) and reason in info.value.reason
    assert f"{path}:2" in str(info.value)


def test_elevant_overlaps_kept_and_nil_mapped(tmp_path):
    labels = [{"span": [0, 10], "entity_id": "Q19837"}, {"span": [6, 10], "entity_id": "<NIL>"},
              {"span": [19, 24], "entity_id": "<NO_MAPPING>"}]
    ds = read_elevant(write_jsonl(tmp_path / "el.jsonl", [el_doc(0, labels)]))
    ms = ds.examples[0].mentions
    assert [(m.start, m.entity_id, m.raw_entity_id) for m in ms] == [
        (0, "Q19837", "Q19837"), (6, NIL_ID, "<NIL>"), (19, NIL_ID, "<NO_MAPPING>")]
    assert "1 pairs of overlapping mention spans (kept)" in ds.notes


def test_entity_kb(tmp_path):
    kb = write_jsonl(tmp_path / "kb.jsonl", [
        {"id": "Q312", "name": "Apple Inc.", "description": "American technology company"},
        {"id": "Q89", "name": "apple", "description": "fruit"},
    ])
    ds = read_elevant(write_jsonl(tmp_path / "el.jsonl", [el_doc(0)]), kb_path=kb)
    assert ds.documents["Q312"].text == "American technology company" and ds.documents["Q89"].title == "apple"
    assert FALLBACK_KB_NOTE not in ds.notes
    assert any(n.startswith("1 gold entity ids are not in the KB") and "Q19837" in n for n in ds.notes)

    for rows, line, field in [
        ([{"id": "Q1", "name": "a"}, {"id": "Q1", "name": "b"}], 2, "id"),
        ([{"id": "Q1", "name": " ", "description": "x"}], 1, "name"),
    ]:
        with pytest.raises(InputError) as info:
            read_entity_kb(write_jsonl(tmp_path / "bad_kb.jsonl", rows))
        assert (info.value.line, info.value.field) == (line, field)


# ---------------------------------------------------------------------------------------------
# OneGen reference format (train.jsonl + db.jsonl)
# ---------------------------------------------------------------------------------------------

DB = [
    {"uid": "d1", "messages": [{"role": "user", "content": "Steve Jobs founded Apple.[Document Fragment Representation]"}]},
    {"id": "d2", "title": "Apple", "text": "Apple is based in Cupertino. [RD]"},
    {"doc_id": "d3", "contents": "Cupertino is in California."},
]


def reference_train() -> list[dict]:
    # the reference's layout: alternating turns, paragraphs in user turns, its own query token
    turns = {"messages": [
        {"role": "user", "content": "Where is the company Steve Jobs founded?"},
        {"role": "assistant", "content": "Steve Jobs founded[Question Representation]"},
        {"role": "user", "content": "<paragraph>Steve Jobs founded Apple.</paragraph>"},
        {"role": "assistant", "content": "Apple is based in[Question Representation]"},
        {"role": "user", "content": "<paragraph>Apple is based  in Cupertino.</paragraph>"},
        {"role": "assistant", "content": "Cupertino"},
    ]}
    # our layout: one assistant turn, [RQ] inline, explicit fragment-level positives and negatives
    inline = {"id": "ex2", "messages": [
        {"role": "user", "content": "In which state is Cupertino?"},
        {"role": "assistant", "content": "Cupertino [RQ]<paragraph>Cupertino is in California.</paragraph>California",
         "positive": [["d3-0", "d3-1"]], "negative": [["d1", "d2-0"]]},
    ]}
    return [turns, inline]


def test_onegen_reference_format(tmp_path):
    db = write_jsonl(tmp_path / "db.jsonl", DB)
    train = write_jsonl(tmp_path / "train.jsonl", reference_train())
    ds = read_onegen_reference(train, db)
    assert set(ds.documents) == {"d1", "d2", "d3"} and ds.documents["d2"].text == "Apple is based in Cupertino."
    first, second = ds.examples
    assert (first.question, first.answer, first.hops) == ("Where is the company Steve Jobs founded?", "Cupertino", ["d1", "d2"])
    assert first.hop_leads == ["Steve Jobs founded", "Apple is based in"] and first.example_id == "train.jsonl:1"
    assert (second.example_id, second.answer, second.hops) == ("ex2", "California", ["d3"])
    assert second.extra["negatives"] == [["d1", "d2"]] and second.context_doc_ids == ["d3", "d1", "d2"]
    assert read_benchmark("onegen", train, db_path=db).examples[1].hops == ["d3"]


def test_onegen_reference_unknown_paragraph(tmp_path):
    db = write_jsonl(tmp_path / "db.jsonl", DB)
    rows = reference_train()
    rows[0]["messages"][2]["content"] = "<paragraph>Bill Gates founded Microsoft.</paragraph>"
    with pytest.raises(InputError) as info:
        read_onegen_reference(write_jsonl(tmp_path / "train.jsonl", rows), db)
    assert (info.value.line, info.value.field) == (1, "messages[2].content")
    assert "paragraph not found in db.jsonl" in info.value.reason

    rows = reference_train()
    rows[1]["messages"][1]["positive"] = [["d9"]]
    with pytest.raises(InputError) as info:
        read_onegen_reference(write_jsonl(tmp_path / "train.jsonl", rows), db)
    assert (info.value.line, info.value.field) == (2, "messages[1].positive[0][0]")


def test_onegen_reference_db_errors(tmp_path):
    db = write_jsonl(tmp_path / "db.jsonl", [{"id": "d1", "text": "a"}, {"id": "d1", "text": "b"}])
    with pytest.raises(InputError) as info:
        read_onegen_reference(write_jsonl(tmp_path / "train.jsonl", []), db)
    assert (info.value.line, info.value.field) == (2, "id")


# ---------------------------------------------------------------------------------------------
# Hub and dispatch
# ---------------------------------------------------------------------------------------------


def test_hub_refuses_without_network():
    with pytest.raises(NetworkRefused, match="allow_network=True"):
        load_from_hub("hotpotqa/hotpot_qa", "validation", None, allow_network=False)


@pytest.mark.shared_data
def test_hub_rows_convert_like_the_file():
    import datasets

    raw = load_raw(shared_file(HOTPOT_DISTRACTOR))[:5]
    hub_rows = [{
        "id": r["_id"], "question": r["question"], "answer": r["answer"], "type": r["type"], "level": r["level"],
        "supporting_facts": {"title": [t for t, _ in r["supporting_facts"]], "sent_id": [s for _, s in r["supporting_facts"]]},
        "context": {"title": [t for t, _ in r["context"]], "sentences": [s for _, s in r["context"]]},
    } for r in copy.deepcopy(raw)]
    hub = dataset_from_rows(datasets.Dataset.from_list(hub_rows), "hub:test")
    ref = read_hotpotqa(shared_file(HOTPOT_DISTRACTOR))
    assert [(e.example_id, e.hops, e.context_doc_ids) for e in hub.examples] == [
        (e.example_id, e.hops, e.context_doc_ids) for e in ref.examples[:5]]


@pytest.mark.shared_data
def test_read_benchmark_dispatch():
    assert len(read_benchmark("elevant", shared_file(ELEVANT.format("kore50"))).examples) == 50
    with pytest.raises(ValueError, match="2wiki"):
        read_benchmark("squad", "x.json", None)
