"""Entity-linking inference: marked output -> spans, the [LK] query, [CON] forcing, end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from data_prep.records import NIL_ID, LinkingExample, Mention
from evaluation.align import MarkedMention, MarkedOutput, align_mentions, parse_marked
from evaluation.index import build_index, open_index
from evaluation.linking import LinkConfig, link_row, run_linking, summarize_linking
from evaluation.metrics import el_scores
from evaluation.runtime import load_runtime, tagger_for
from onegen.hidden import hidden_at
from onegen.prepared import open_prepared
from tests.eval_fixtures import decoder_call_counter, random_model, trained_model, world  # noqa: F401

TEXT = "Laves met Laves in Roneria. Then Letaso left Laves."
#       0         10        20        30        40        50


@pytest.fixture(scope="module")
def tagger(world):  # noqa: F811
    tok = AutoTokenizer.from_pretrained(str(world / "tokenizer"), local_files_only=True)
    return tagger_for(tok, {}, open_prepared(world / "el_dev"))


def _parse(tagger, ids):
    return parse_marked(ids, tagger.tok, mention_open=tagger.tid("mention_open"), lk=tagger.tid("lk"),
                        con=tagger.tid("con"), eos=tagger.eos)


def test_spans_from_tagger_output_repeated_mention_and_nil(tagger):
    # The second "Laves" (10..15) and the third (45..50) are linked; "Letaso" is NIL (left unmarked).
    ex = LinkingExample("x", TEXT, [Mention(10, 15, "E1"), Mention(19, 26, "E2"), Mention(33, 39, NIL_ID),
                                    Mention(45, 50, "E1")])
    row, positives = tagger.link_row(ex)
    assert positives == ["E1", "E2", "E1"]
    marked = _parse(tagger, row.input_ids[row.prompt_len:])
    assert marked.text == " " + TEXT and [marked.surface(m) for m in marked.mentions] == ["Laves", "Roneria", "Laves"]
    spans = align_mentions(marked, TEXT)
    assert spans == [(10, 15), (19, 26), (45, 50)]
    preds = [(s, e, positives[m.link]) for m, (s, e) in zip(marked.mentions, spans)]
    scores = el_scores([preds], [[(m.start, m.end, m.entity_id) for m in ex.mentions]])
    assert scores["tp"] == 3 and scores["fp"] == scores["fn"] == 0 and scores["f1"] == 1.0
    assert scores["md_fn"] == 1  # the NIL gold span was not detected (mention detection counts it)


def test_spans_from_hand_made_output(tagger):
    enc = tagger.encode
    m, lk, con = tagger.tid("mention_open"), tagger.tid("lk"), tagger.tid("con")
    # The model marks the FIRST "Laves" and the LAST one, and a stray [LK] without <m>.
    ids = [m] + enc(" Laves") + [lk, con] + enc(" met Laves in Roneria. Then Letaso left ") + [m] + enc("Laves") + \
        [lk, con] + enc(".") + [lk, con] + [tagger.eos] + enc(" ignored")
    marked = _parse(tagger, ids)
    assert marked.stray_links == [2] and [mm.link for mm in marked.mentions] == [0, 1]
    assert align_mentions(marked, TEXT) == [(0, 5), (45, 50)]


def test_alignment_survives_rewrites():
    # The model dropped "in" and changed a word: ends that no longer line up fall back to the
    # surface's occurrence nearest to where the alignment puts it (never before the previous mention).
    g = " Laves met Laves Roneria. Then Letaso went Laves."
    out = MarkedOutput(g, [MarkedMention(11, 16, 0), MarkedMention(17, 24, 1), MarkedMention(43, 48, 2)], [])
    assert align_mentions(out, TEXT) == [(10, 15), (19, 26), (45, 50)]
    # A surface absent from the text cannot be placed: None, never a guess.
    out = MarkedOutput(" Laves met Zorro", [MarkedMention(11, 16, 0)], [])
    assert align_mentions(out, TEXT) == [None]


@pytest.fixture(scope="module")
def el_setup(random_model, world, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("el_idx") / "el_dev"
    build_index(random_model, world / "el_dev", out, progress=False)
    data = open_prepared(world / "el_dev")
    return load_runtime(random_model, data, device="cpu"), open_index(out, random_model), data


def test_replay_gold_output_links_every_mention(el_setup):
    rt, idx, data = el_setup
    rows = [r for r in data.query_rows(list(range(len(data)))) if len(r["positives"]) >= 2][:2]
    assert rows
    for row in rows:
        stats, handle = decoder_call_counter(rt)
        try:
            r = link_row(rt, row, idx, LinkConfig(k=3), replay=row["input_ids"][row["prompt_len"]:])
        finally:
            handle.remove()
        gold_linked = [(m["start"], m["end"]) for m in row["mentions"] if m["entity_id"] != NIL_ID]
        assert [(s, e) for s, e, _ in r.predictions] == gold_linked and r.unaligned == 0
        assert r.stop_reason == "eos" and len(r.links) == len(row["positives"]) == r.link_forwards
        # [CON] is forced with [LK] in the same forward: one forward per link, none extra.
        assert stats["calls"] == r.prefills + r.decode_steps + r.link_forwards
        context = list(row["input_ids"])
        assert list(row["input_ids"][: row["prompt_len"]]) + r.output_ids == context
        for link, (_, _, ent) in zip(r.links, r.predictions):
            assert context[link.position] == rt.ids["lk"] and context[link.position + 1] == rt.ids["con"]
            fresh = hidden_at(rt.model, [context[: link.position + 1]], [[link.position]], rt.pad_id)[0][0]
            np.testing.assert_allclose(link.query, fresh, atol=1e-4)
            assert ent == link.retrieved[0][0] and len(link.retrieved) == 3
    s = summarize_linking([r])
    assert s["md_f1"] > 0 and 0 <= s["link_recall_at_1"] <= 1


def test_free_decoding_is_well_formed(el_setup):
    rt, idx, data = el_setup
    row = data.query_rows([0])[0]
    r = link_row(rt, row, idx, LinkConfig(max_new_tokens=30))
    assert r.n_generated <= 30 and r.stop_reason in ("eos", "max_new_tokens")
    never = {rt.ids[k] for k in ("rq", "rd", "para_open", "para_close", "se")}
    assert not never & set(r.output_ids)
    lk, con = rt.ids["lk"], rt.ids["con"]
    assert all(r.output_ids[i + 1] == con for i, t in enumerate(r.output_ids) if t == lk)
    assert all(0 <= s < e <= len(row["question"]) for s, e, _ in r.predictions)
    json.dumps(r.to_dict())


@pytest.mark.slow
def test_linking_end_to_end_trained(trained_model, world, tmp_path):  # noqa: F811
    build_index(trained_model, world / "el_dev", tmp_path / "kb", progress=False)
    idx = open_index(tmp_path / "kb", trained_model)
    rt = load_runtime(trained_model, open_prepared(world / "el_dev"), device="cpu")
    free = run_linking(rt, idx, LinkConfig(max_new_tokens=40), indices=range(3), progress=False)
    given = run_linking(rt, idx, indices=range(3), gold_mentions=True, progress=False)
    for results in (free, given):
        s = summarize_linking(results)
        for key in ("precision", "recall", "f1", "md_f1"):
            assert 0.0 <= s[key] <= 1.0
        assert s["n"] == 3
        for r in results:
            json.loads(json.dumps(r.to_dict()))
    s = summarize_linking(given)
    assert s["md_recall"] > 0.5 and s["link_recall_at_1"] is not None


def test_batched_linking_gives_the_batch_1_results(el_setup):
    rt, idx, data = el_setup
    indices = list(range(min(5, len(data))))
    for gold in (True, False):
        cfg = LinkConfig(k=3, max_new_tokens=None if gold else 24)
        alone = run_linking(rt, idx, cfg, indices, gold_mentions=gold, progress=False)
        stats, handle = decoder_call_counter(rt)
        try:
            together = run_linking(rt, idx, LinkConfig(**{**cfg.__dict__, "batch_size": 3}), indices, gold_mentions=gold,
                                   progress=False)
        finally:
            handle.remove()
        assert stats["calls"] < sum(r.prefills + r.decode_steps + r.link_forwards for r in alone)
        for a, b in zip(alone, together):
            assert (a.output_ids, a.predictions, a.stop_reason) == (b.output_ids, b.predictions, b.stop_reason)
            assert (a.decode_steps, a.prefills, a.link_forwards) == (b.decode_steps, b.prefills, b.link_forwards)
            assert [[d for d, _ in l.retrieved] for l in a.links] == [[d for d, _ in l.retrieved] for l in b.links]
            for la, lb in zip(a.links, b.links):
                np.testing.assert_allclose(la.query, lb.query, atol=1e-4)
        if gold:  # replaying the gold output links every gold mention
            assert sum(len(r.links) for r in together) == sum(len(r["positives"]) for r in data.query_rows(indices))


def test_gold_link_accuracy_is_onegens_top1_on_the_replayed_gold_links(el_setup):
    from evaluation.index import DocIndex
    from evaluation.linking import gold_link_accuracy
    from evaluation.teacher_forced import teacher_forced_recall

    rt, idx, data = el_setup
    indices = list(range(len(data)))
    replayed = run_linking(rt, idx, LinkConfig(k=3), indices, gold_mentions=True, progress=False)
    acc = gold_link_accuracy(replayed)
    gold = [g for r in data.query_rows(indices) for g in r["positives"]]
    tops = [l.retrieved[0][0] for r in replayed for l in r.links]
    assert acc["n"] == len(gold) == len(tops) > 0 and acc["right"] == sum(t == g for t, g in zip(tops, gold))
    assert acc["acc"] == pytest.approx(acc["right"] / acc["n"])
    # The same [LK] states as the teacher-forced pass (gold context, causal): the same top-1 up to float ties.
    tf = teacher_forced_recall(rt, idx, setting="open", batch_size=4, progress=False)
    assert tf["n"] == acc["n"] and abs(tf["recall@1"] - acc["acc"]) <= 1 / acc["n"]
    # A KB whose entity vectors ARE the gold [LK] states: every gold link is right; with the labels rolled, none.
    q = np.stack([l.query for r in replayed for l in r.links])
    ids = [f"{g}#{i}" for i, g in enumerate(gold)]  # one vector per link (an entity may be linked twice)
    exact = DocIndex.from_arrays(ids, q)
    perfect = run_linking(rt, exact, LinkConfig(k=1), indices, gold_mentions=True, progress=False)
    right = [l.retrieved[0][0] for r in perfect for l in r.links]
    assert [x.split("#")[0] for x in right] == gold
    assert gold_link_accuracy([_relabel(r) for r in perfect])["acc"] == 1.0
    rolled = DocIndex.from_arrays(ids[1:] + ids[:1], q)
    wrong = run_linking(rt, rolled, LinkConfig(k=1), indices, gold_mentions=True, progress=False)
    assert gold_link_accuracy([_relabel(r) for r in wrong])["acc"] < 0.5


def _relabel(r):
    """Strip the ``#i`` suffix of the test KB's ids from a result's retrieved entities."""
    for l in r.links:
        l.retrieved = [(d.split("#")[0], s) for d, s in l.retrieved]
    return r


def _kb(docs: list[tuple[str, str]], texts: list[tuple[str, list[tuple[int, int, str]]]]):
    from types import SimpleNamespace

    from datasets import Dataset

    d = Dataset.from_dict({"doc_id": [i for i, _ in docs], "title": [t for _, t in docs]})
    q = Dataset.from_dict({"question": [t for t, _ in texts],
                           "mentions": [[{"start": s, "end": e, "entity_id": x} for s, e, x in ms] for _, ms in texts]})
    return SimpleNamespace(docs=d, queries=q)


def test_name_match_baseline_by_hand():
    from evaluation.linking import linked_gold_mentions, name_match_baseline

    text = "Paris and  Texas   City met Rome; Zed Zed."
    #       0         10        20        30        40
    assert [text[s:e] for s, e in ((0, 5), (11, 23), (28, 32), (34, 41))] == ["Paris", "Texas   City", "Rome", "Zed Zed"]
    mentions = [(0, 5, "E2"), (11, 23, "E3"), (28, 32, "E9"), (34, 37, NIL_ID), (34, 41, "E4"), (38, 41, "E5")]
    data = _kb([("E3", "texas city"), ("E2", "Paris"), ("E1", "PARIS"), ("E4", "Zed Zed"), ("E5", "Zed"), ("E6", "")],
               [(text, mentions), ("Zed", [(0, 3, "E5")])])
    # NIL not linked; (38, 41) overlaps the linked (34, 41): dropped, as the tagger drops it (no [LK] for it).
    assert linked_gold_mentions([{"start": s, "end": e, "entity_id": x} for s, e, x in mentions]) == \
        [(0, 5, "E2"), (11, 23, "E3"), (28, 32, "E9"), (34, 41, "E4")]
    got = name_match_baseline(data, ["E1", "E2", "E3", "E4", "E5", "E6"], [0, 1])
    # "Paris": E1 and E2 share the name -> E1 (first by doc id), wrong; "Texas   City" -> E3 right (case,
    # whitespace); "Rome": no such name, wrong; "Zed Zed" -> E4 right; "Zed" -> E5 right.
    assert got == {"acc": 3 / 5, "right": 3, "n": 5, "ambiguous": 1, "no_name": 1, "kb_size": 6}
    # Over a KB without E1, "Paris" is E2's alone; the baseline only sees the KB it is given.
    got = name_match_baseline(data, ["E2", "E3", "E4", "E5"], [0])
    assert got["acc"] == 3 / 4 and got["ambiguous"] == 0 and got["kb_size"] == 4
    assert name_match_baseline(data, ["E2"], [])["acc"] is None


def test_gold_mention_table_sets_onegen_beside_name_match_mention_by_mention():
    from evaluation.linking import Link, LinkResult, agreement, gold_mention_table, name_match_links

    text = "Paris met Rome and Zed."
    data = _kb([("E1", "Paris"), ("E2", "Rome"), ("E3", "Zed")],
               [(text, [(0, 5, "E1"), (10, 14, "E9"), (19, 22, "E3")])])
    rows, ambiguous = name_match_links(data, ["E1", "E2", "E3"], [0])
    assert [[m["mention"], m["name_match"]] for m in rows[0]] == [["Paris", "E1"], ["Rome", "E2"], ["Zed", "E3"]]
    replayed = LinkResult("0", text, "", [], [], ["E1", "E9", "E3"],
                          [Link([("E2", 0.9)], 1), Link([("E9", 0.8)], 2)], 0, "eos", 0, 0, 1, 0, 0.0)
    table = gold_mention_table([replayed], rows)
    # the third gold mention got no [LK] in the replay: OneGen's entity is None there, and it counts as wrong
    assert [m["onegen"] for m in table[0]] == ["E2", "E9", None] and ambiguous == 0
    assert agreement(table) == {"both": 0, "onegen_only": 1, "name_match_only": 2, "neither": 0}
