"""One-pass RAG inference: forward accounting, the [RQ] query vector, baselines, dialogue, end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from evaluation.generate import (GenerationConfig, answer_of, answer_row, final_answer, run_dialogue,
                                 run_questions)
from evaluation.index import build_index, open_index
from evaluation.retrievers import (BM25Retriever, DenseRetriever, NoRetriever, OneGenRetriever, RetrievalStep,
                                   TwoPassRetriever, build_retriever)
from evaluation.runtime import load_runtime, row_groups
from evaluation.scoring import summarize_rag
from evaluation.teacher_forced import teacher_forced_recall
from onegen.errors import ConfigError, ManifestMismatch
from onegen.hidden import hidden_at
from onegen.prepared import open_prepared
from tests.eval_fixtures import decoder_call_counter, random_model, trained_model, world  # noqa: F401


@pytest.fixture(scope="module")
def setup(random_model, world, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("gen_idx") / "rag_dev"
    build_index(random_model, world / "rag_dev", out, progress=False)
    data = open_prepared(world / "rag_dev")
    rt = load_runtime(random_model, data, device="cpu")
    return rt, open_index(out, random_model), data


def _fresh_state(rt, context: list[int], position: int) -> np.ndarray:
    """The normalised state at ``position`` from a fresh full forward of ``context[:position + 1]``."""
    return hidden_at(rt.model, [context[: position + 1]], [[position]], rt.pad_id)[0][0]


def test_one_pass_forward_accounting_and_query_vector(setup):
    rt, idx, data = setup
    row = data.query_rows([0])[0]
    cfg = GenerationConfig(max_new_tokens=14, max_hops=2, force_retrieval_every=3, k=4)
    retriever = OneGenRetriever(idx)
    stats, handle = decoder_call_counter(rt)
    try:
        r = answer_row(rt, row, retriever, cfg)
    finally:
        handle.remove()
    context = list(row["input_ids"][: row["prompt_len"]]) + r.output_ids
    rq = rt.ids["rq"]
    assert len(r.hops) == 2 and r.output_ids.count(rq) == 2 and r.stop_reason == "max_new_tokens"
    assert r.n_generated == 14 and r.context_tokens == len(context)
    # Exactly: one prefill for the prompt, one forward per generated token but the last, one prefill per document.
    assert r.prefills == 1 + len(r.hops) and r.decode_steps == r.n_generated - 1
    assert stats["calls"] == 1 + (r.n_generated - 1) + len(r.hops) == r.prefills + r.decode_steps
    # Never re-running the prefix: every context token but the last went through the model exactly once.
    assert stats["tokens"] == len(context) - 1
    assert retriever.forward_calls == 0 and r.retriever_forwards == 0
    # [RQ] forced after every 3 generated tokens; each followed by one whole <paragraph> ... </paragraph>.
    for h in r.hops:
        assert context[h.position] == rq and context[h.position + 1] == rt.ids["para_open"]
        assert h.inserted == h.retrieved[0][0] and set(d for d, _ in h.retrieved) <= set(row["candidates"])
        assert len(h.retrieved) == 4
        # The query vector equals the state a fresh forward of the same prefix gives at [RQ].
        fresh = _fresh_state(rt, context, h.position)
        np.testing.assert_allclose(h.query, fresh, atol=1e-4)
        np.testing.assert_allclose([s for _, s in h.retrieved],
                                   [s for _, s in idx.search(fresh[None], 4, [list(row["candidates"])])[0]], atol=1e-4)
    doc = rt.docs.get(r.hops[0].inserted)
    para = rt.tagger.paragraph_ids(doc, budget=rt.tagger.cfg.max_doc_length)
    p = r.hops[0].position + 1
    assert context[p:p + len(para)] == para


def test_two_pass_makes_one_forward_per_retrieval_and_agrees(setup):
    rt, idx, data = setup
    row = data.query_rows([1])[0]
    cfg = GenerationConfig(max_new_tokens=12, max_hops=3, force_retrieval_every=2)
    one = answer_row(rt, row, OneGenRetriever(idx), cfg)
    two_ret = TwoPassRetriever(rt.model, rt.tokenizer, idx, rt.tagger)
    stats, handle = decoder_call_counter(rt)
    try:
        two = answer_row(rt, row, two_ret, cfg)
    finally:
        handle.remove()
    assert len(two.hops) == 3 and two_ret.forward_calls == 3 == two.retriever_forwards
    assert stats["calls"] == two.prefills + two.decode_steps + two_ret.forward_calls
    # Same model, same prefix: the second pass finds what the one pass found, at the cost of a forward.
    assert one.output_ids == two.output_ids
    assert [h.retrieved[0][0] for h in one.hops] == [h.retrieved[0][0] for h in two.hops]
    np.testing.assert_allclose(two_ret.last_query, one.hops[-1].query, atol=1e-4)
    # Rebuilt from text when the loop gives no ids: prompt(question) + generated text + [RQ].
    step = RetrievalStep(question=row["question"], generated_text=" Search:", k=2, candidates=list(row["candidates"]))
    ids = two_ret.query_ids(step)
    assert ids[: row["prompt_len"]] == list(row["input_ids"][: row["prompt_len"]]) and ids[-1] == rt.ids["rq"]


def _same_result(a, b) -> None:
    assert (a.output_ids, a.stop_reason, a.answer, a.n_generated) == (b.output_ids, b.stop_reason, b.answer, b.n_generated)
    assert (a.decode_steps, a.prefills, a.retriever_forwards, a.context_tokens) == \
        (b.decode_steps, b.prefills, b.retriever_forwards, b.context_tokens)
    assert [(h.position, h.inserted, [d for d, _ in h.retrieved]) for h in a.hops] == \
        [(h.position, h.inserted, [d for d, _ in h.retrieved]) for h in b.hops]
    for ha, hb in zip(a.hops, b.hops):
        np.testing.assert_allclose(ha.query, hb.query, atol=1e-4)
        np.testing.assert_allclose([s for _, s in ha.retrieved], [s for _, s in hb.retrieved], atol=1e-4)


def test_batched_decoding_gives_the_batch_1_results(setup):
    rt, idx, data = setup
    indices = [0, 3, 5, 6, 7]
    rows = data.query_rows(indices)
    assert len({r["prompt_len"] for r in rows}) > 1  # contexts of different lengths share the cache
    cfg = GenerationConfig(max_new_tokens=14, max_hops=2, force_retrieval_every=3, k=4)
    for retriever in (OneGenRetriever(idx), build_retriever("two_pass", rt, idx)):
        alone = [answer_row(rt, row, retriever, cfg) for row in rows]
        stats, handle = decoder_call_counter(rt)
        try:
            together = run_questions(rt, retriever, GenerationConfig(**{**cfg.__dict__, "batch_size": 3}), indices,
                                     progress=False)
        finally:
            handle.remove()
        for a, b in zip(alone, together):
            _same_result(a, b)
        # Two groups (3 + 2 questions) on the same forced schedule: one forward per step for a whole
        # group (plus the two-pass retriever's own forwards), not one per question and step.
        steps = [r.prefills + r.decode_steps for r in alone]
        assert stats["calls"] == max(steps[:3]) + max(steps[3:]) + sum(r.retriever_forwards for r in alone)
    # A question whose prompt alone overflows the context stops unfed; the rest of its group goes on.
    lens = sorted(r["prompt_len"] for r in rows)
    tight = GenerationConfig(max_new_tokens=2, max_hops=0, max_context=lens[-1] - 1, batch_size=5)
    together = run_questions(rt, OneGenRetriever(idx), tight, indices, progress=False)
    alone = [answer_row(rt, row, OneGenRetriever(idx), tight) for row in rows]
    unfed = [r for r in together if r.prefills == 0]
    assert len(unfed) == 1 and unfed[0].stop_reason == "context_full" and unfed[0].n_generated == 0
    assert "max_new_tokens" in {r.stop_reason for r in together}
    for a, b in zip(alone, together):
        _same_result(a, b)
    with pytest.raises(ConfigError, match="batch_size"):
        GenerationConfig(batch_size=0)
    # Groups are cut from the rows in order, any size (none capped at the 64-row read chunk).
    n = len(data)
    assert [[r["example_id"] for r in g] for g in row_groups(data, range(n), 4)] == \
        [[r["example_id"] for r in data.query_rows(list(range(n)))[i:i + 4]] for i in range(0, n, 4)]
    assert [len(g) for g in row_groups(data, range(n), 100)] == [n]


def test_baselines_and_forced_lengths(setup):
    rt, idx, data = setup
    rows = data.query_rows([2, 3])
    bm25 = BM25Retriever(rt.docs.all())
    for retriever in (bm25, NoRetriever(), build_retriever("onegen", rt, idx)):
        for row in rows:
            r = answer_row(rt, row, retriever, GenerationConfig(force_new_tokens=9, force_retrieval_every=4, max_hops=1))
            assert r.n_generated == 9 and r.stop_reason == "forced_length" and len(r.hops) == 1
            assert rt.eos_id not in r.output_ids
            if isinstance(retriever, NoRetriever):
                assert r.hops[0].retrieved == [] and r.hops[0].inserted is None
                assert r.output_ids[r.output_ids.index(rt.ids["rq"]) + 1:][:2] == [rt.ids["para_open"], rt.ids["para_close"]]
            else:
                assert r.hops[0].inserted in row["candidates"]
    # BM25 ranks by the question text: the question's own entity paragraph wins in the distractor setting.
    q = rows[0]["question"]
    hits = bm25.retrieve(RetrievalStep(question=q, generated_text="", k=3, candidates=list(rows[0]["candidates"])))
    assert hits[0][0] in q and hits[0][1] > 0
    # Open setting: the whole pool.
    r = answer_row(rt, rows[0], build_retriever("onegen", rt, idx),
                   GenerationConfig(max_new_tokens=6, force_retrieval_every=2, setting="open", k=3))
    assert r.setting == "open" and all(len(h.retrieved) == 3 for h in r.hops)


def test_dense_pipeline_retriever(setup):
    from data_prep.encoders import MeanPoolEncoder, default_minilm_path

    rt, idx, data = setup
    dense = DenseRetriever(MeanPoolEncoder(default_minilm_path()), rt.docs.all())
    row = data.query_rows([5])[0]
    cands = list(row["candidates"])
    hits = dense.retrieve(RetrievalStep(question=row["question"], generated_text="", k=3, candidates=cands))
    assert len(hits) == 3 and {d for d, _ in hits} <= set(cands) and hits[0][1] >= hits[2][1]
    assert dense.forward_calls == 1
    r = answer_row(rt, row, dense, GenerationConfig(max_new_tokens=6, force_retrieval_every=2, max_hops=1))
    assert len(r.hops) == 1 and r.retriever_forwards == 1 and r.retriever == "dense"


def test_dense_pipeline_encodes_only_the_evaluated_rows_paragraphs_in_the_distractor_setting(setup, monkeypatch):
    """MiniLM ranks each row's own candidates in the distractor setting, so the run encodes only those (not
    every document of the dataset), and ranks them exactly as with every document encoded."""
    from types import SimpleNamespace

    from data_prep import encoders
    from evaluation.tasks import rag_generate

    rt, idx, data = setup
    rows = [0, 3, 5]
    own = set()
    for r in data.query_rows(rows):
        own |= set(r["candidates"]) | set(r["positives"])
    assert len(own) < len(rt.docs)  # else the test shows nothing
    encoded = []

    class Counting(encoders.MeanPoolEncoder):
        def encode(self, texts, batch_size=64):
            encoded.append(len(texts))
            return super().encode(texts, batch_size=batch_size)

    monkeypatch.setattr(encoders, "MeanPoolEncoder", Counting)
    req = SimpleNamespace(max_new_tokens=6, max_hops=1, k=3, setting="distractor", force_retrieval_every=2,
                          gen_batch_size=2, progress=False, batch_size=4, pipeline_query="full")
    raw = rag_generate(req, rt, idx, "dense", rows)
    assert encoded[0] == len(own) and len(raw.results) == 3
    open_req = SimpleNamespace(**{**vars(req), "setting": "open"})
    encoded.clear()
    rag_generate(open_req, rt, idx, "dense", rows[:1])
    assert encoded[0] == len(rt.docs)  # the open setting searches them all
    # the same ranking as over every document
    enc = Counting(encoders.default_minilm_path())
    sub = DenseRetriever(enc, [rt.docs.get(d) for d in sorted(own)])
    full = DenseRetriever(enc, rt.docs.all())
    for r in data.query_rows(rows):
        step = RetrievalStep(question=r["question"], generated_text="", k=3, candidates=list(r["candidates"]))
        a, b = sub.retrieve(step), full.retrieve(step)
        assert [d for d, _ in a] == [d for d, _ in b]
        np.testing.assert_allclose([s for _, s in a], [s for _, s in b], atol=1e-5)


def test_max_hops_masks_rq_and_config_errors(setup):
    rt, idx, data = setup
    row = data.query_rows([4])[0]
    r = answer_row(rt, row, OneGenRetriever(idx), GenerationConfig(max_new_tokens=20, max_hops=0, force_retrieval_every=1))
    assert r.hops == [] and rt.ids["rq"] not in r.output_ids
    banned = [rt.ids[k] for k in ("rd", "para_open", "para_close", "lk", "se", "con", "mention_open")]
    assert not set(banned) & set(r.output_ids)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        GenerationConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match="hidden state"):
        OneGenRetriever(idx).retrieve(RetrievalStep(question="q", generated_text="", k=1))


def test_final_answer_is_the_one_parser():
    assert final_answer(" Search: Answer:  Nedu ") == "Nedu"
    assert final_answer(" Answer: A Search: Answer: B") == "B"  # the last marker
    assert final_answer(" Search:") is None and final_answer(" Search: Answer:  ") is None
    assert answer_of(" Answer: Nedu", "Answer:", "eos") == ("Nedu", True)
    # Cut at the token limit: the text is still scored, but no answer was *found* (the model never finished).
    assert answer_of(" Search: Answer: Nedu Search: Answer: Nedu", "Answer:", "max_new_tokens") == ("Nedu", False)
    assert answer_of(" Search: Answer:", "Answer:", "eos") == ("", False)  # EOS right after the marker
    assert answer_of(" Search: Nedu", "Answer:", "eos") == ("", False)


def _scripted(rt, text: str, eos: bool):
    """A hook on the LM head that makes the model write ``text`` (then EOS, or ``text`` again and again)."""
    ids = rt.tokenizer.encode(text, add_special_tokens=False)
    script = ids + [rt.eos_id] if eos else ids * 50
    calls = {"n": 0}

    def hook(module, args, out):
        forced = torch.full_like(out, -1e4)
        forced[..., script[min(calls["n"], len(script) - 1)]] = 1e4
        calls["n"] += 1
        return forced

    return rt.model.get_output_embeddings().register_forward_hook(hook)


@pytest.mark.parametrize("eos", [True, False])
def test_answer_found_needs_eos_and_a_parsed_answer(setup, eos):
    rt, idx, data = setup
    row = data.query_rows([0])[0]
    handle = _scripted(rt, " Search: Answer: Nedu", eos)
    try:
        r = answer_row(rt, row, NoRetriever(), GenerationConfig(max_new_tokens=30, max_hops=0))
    finally:
        handle.remove()
    assert "Answer:" in r.output_text and r.answer.startswith("Nedu")
    if eos:
        assert r.stop_reason == "eos" and r.answer == "Nedu" and r.answer_found
    else:  # looped "Search: ... Answer: ..." to the token limit: "Answer:" is there, but no answer was found
        assert r.stop_reason == "max_new_tokens" and r.output_text.count("Answer:") >= 2 and not r.answer_found
    assert summarize_rag([r], k=1)["answer_found"] == float(eos)


def test_dialogue_one_context(setup):
    rt, idx, data = setup
    rows = data.query_rows([0, 1, 2])
    cfg = GenerationConfig(force_new_tokens=5, force_retrieval_every=2, max_hops=1)
    stats, handle = decoder_call_counter(rt)
    try:
        rounds = run_dialogue(rt, rows, OneGenRetriever(idx), cfg)
    finally:
        handle.remove()
    assert [r.round for r in rounds] == [0, 1, 2] and all(r.n_generated == 5 and len(r.hops) == 1 for r in rounds)
    # Round i+1 = EOS closing round i, then the next row's prompt; the prefix is never re-run.
    assert rounds[1].prompt_tokens == rows[1]["prompt_len"] + 1 and rounds[1].decode_steps == 4
    assert stats["tokens"] == rounds[-1].context_tokens - 1
    assert stats["calls"] == sum(r.prefills + r.decode_steps for r in rounds)
    # The last round's query sees every earlier round: it equals a fresh forward over the whole context.
    context = []
    for r, row in zip(rounds, rows):
        prompt = list(row["input_ids"][: row["prompt_len"]])
        context += ([rt.eos_id] if context else []) + prompt + r.output_ids
    assert len(context) == rounds[-1].context_tokens
    h = rounds[-1].hops[0]
    np.testing.assert_allclose(h.query, _fresh_state(rt, context, h.position), atol=1e-4)


def test_runtime_refuses_other_tokenizer(random_model, world, tmp_path):  # noqa: F811
    import shutil

    bad = tmp_path / "rag_dev"
    shutil.copytree(world / "rag_dev", bad)
    man = json.loads((bad / "manifest.json").read_text())
    man["tokenizer"]["fingerprint"] = "0" * 64
    (bad / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ManifestMismatch, match="tokenised with tokenizer 000000000000"):
        load_runtime(random_model, open_prepared(bad))


@pytest.mark.slow
def test_end_to_end_trained_checkpoint(trained_model, world, tmp_path):  # noqa: F811
    import time

    t0 = time.perf_counter()
    build_index(trained_model, world / "rag_dev", tmp_path / "idx", progress=False)
    idx = open_index(tmp_path / "idx", trained_model)
    rt = load_runtime(trained_model, open_prepared(world / "rag_dev"), device="cpu")
    cfg = GenerationConfig(max_new_tokens=24, max_hops=2, k=3)
    summaries = {}
    for name in ("onegen", "two_pass", "bm25", "none"):
        results = run_questions(rt, build_retriever(name, rt, idx), cfg, indices=range(4), progress=False)
        assert len(results) == 4
        for r in results:
            d = json.loads(json.dumps(r.to_dict()))  # well-formed, JSON-serialisable predictions
            assert d["gold_hops"] and d["gold_answers"] and d["stop_reason"] in ("eos", "max_new_tokens")
            assert isinstance(d["answer"], str) and d["retriever"] == name
            assert r.decode_steps + 1 == r.n_generated and r.prefills == 1 + len(r.hops)
        s = summarize_rag(results, k=3)
        for key in ("em", "f1", "hop_recall_at_1", "recall@1", "recall@3"):
            assert 0.0 <= s[key] <= 1.0
        summaries[name] = s
        if name == "onegen":  # free generation (natural stops at different steps) batched: the same answers
            batched = run_questions(rt, build_retriever(name, rt, idx), GenerationConfig(**{**cfg.__dict__, "batch_size": 4}),
                                    indices=range(4), progress=False)
            for a, b in zip(results, batched):
                _same_result(a, b)
    assert summaries["none"]["recall@1"] == 0.0
    # Forced retrieval surely exercises recall in free generation with the trained model too.
    forced = run_questions(rt, build_retriever("onegen", rt, idx), GenerationConfig(max_new_tokens=12, force_retrieval_every=3,
                                                                                   max_hops=2, k=3), indices=range(4), progress=False)
    s = summarize_rag(forced, k=3)
    assert s["n_hops"] == 2 and 0 <= s["hop_recall_at_1"] <= s["recall@3"] <= 1
    tf = teacher_forced_recall(rt, idx, progress=False)
    assert tf["n"] == 2 * len(rt.data) and {"recall@1/hop1", "recall@1/hop2"} <= set(tf)
    assert time.perf_counter() - t0 < 60
