"""Hand-computed checks of evaluation.metrics (design §6)."""

from __future__ import annotations

import pytest

from evaluation.metrics import (
    NIL_ID,
    aggregate,
    best_over_aliases,
    el_scores,
    exact_match,
    f1,
    hop_recall_at_1,
    mean_reciprocal_rank,
    normalize_answer,
    recall_at_k,
)


def test_nil_id_matches_records():
    from data_prep.records import NIL_ID as RECORDS_NIL_ID

    assert NIL_ID == RECORDS_NIL_ID


# ---------------------------------------------------------------- answers


def test_articles_removed_as_whole_words_only():
    assert normalize_answer("The Beatles") == "beatles"
    assert exact_match("An apple", "apple") == 1.0
    assert normalize_answer("Theatre of a banana") == "theatre of banana"  # "a" inside words stays
    assert normalize_answer("the. A, an!") == ""  # punctuation goes first, then the articles


def test_punctuation_deleted_not_spaced():
    assert normalize_answer("U.S.A.") == "usa"
    assert exact_match("well-known", "wellknown") == 1.0
    assert exact_match("well-known", "well known") == 0.0
    assert exact_match("Yes.", "yes") == 1.0


def test_whitespace_collapsed():
    assert normalize_answer("  New\tYork \n City ") == "new york city"
    assert exact_match("New\u00a0York", "new york") == 1.0  # no-break space is whitespace


def test_unicode_accents_kept_and_unicode_punctuation_removed():
    assert exact_match("Röntgen", "Röntgen") == 1.0
    assert exact_match("RÖNTGEN", "röntgen") == 1.0
    assert exact_match("Röntgen", "Rontgen") == 0.0
    assert f1("Wilhelm Röntgen", "Wilhelm Rontgen")[0] == pytest.approx(0.5)
    assert exact_match("Ro\u0308ntgen", "R\u00f6ntgen") == 1.0  # decomposed == composed (NFC)
    assert exact_match("O’Brien", "O'Brien") == 1.0  # curly apostrophe is punctuation
    assert exact_match("“Hamlet”", "Hamlet") == 1.0
    assert exact_match("1990–1995", "1990-1995") == 1.0  # en dash like hyphen
    assert normalize_answer("«Les Misérables»") == "les misérables"
    assert normalize_answer("100 €") == "100 €"  # symbols are not punctuation


def test_official_normalization_differs_on_unicode_only():
    """--normalization official: the HotpotQA script's rules, no NFC, ASCII punctuation only."""
    off = dict(normalization="official")
    # Unicode punctuation stays in the official text, goes in ours.
    assert normalize_answer("O’Brien", **off) == "o’brien" and normalize_answer("O’Brien") == "obrien"
    assert exact_match("O’Brien", "O'Brien") == 1.0 and exact_match("O’Brien", "O'Brien", **off) == 0.0
    assert exact_match("1990—1995", "19901995") == 1.0 and exact_match("1990—1995", "19901995", **off) == 0.0
    assert exact_match("“Hamlet”", "Hamlet", **off) == 0.0
    assert f1("the “Hamlet” play", "Hamlet play", **off)[0] == pytest.approx(0.5)  # "“hamlet”" != "hamlet"
    assert f1("the “Hamlet” play", "Hamlet play")[0] == 1.0
    # No NFC in the official script: a decomposed ö is not a composed one.
    assert exact_match("Ro\u0308ntgen", "R\u00f6ntgen") == 1.0
    assert exact_match("Ro\u0308ntgen", "R\u00f6ntgen", **off) == 0.0
    # ASCII punctuation, articles, case and whitespace: the same in both.
    for a, b in (("U.S.A.", "usa"), ("The  Beatles!", "beatles"), ("well-known", "wellknown"), ("Yes.", "yes")):
        assert exact_match(a, b, **off) == exact_match(a, b) == 1.0
    assert normalize_answer("  The\tNew York, a City ", **off) == "new york city"
    assert f1("yes", "yes sir", **off) == (0.0, 0.0, 0.0) and f1("no answer", "noanswer", **off) == (0.0, 0.0, 0.0)
    assert best_over_aliases("O’Brien", ["Obrien", "x"], **off) == {"em": 0.0, "f1": 0.0}
    assert best_over_aliases("O’Brien", ["Obrien", "x"]) == {"em": 1.0, "f1": 1.0}
    with pytest.raises(ValueError, match="choose one of"):
        normalize_answer("x", normalization="squad")


def test_yes_no_rule():
    assert f1("yes", "no") == (0.0, 0.0, 0.0)
    # "yes" vs "yes sir": a token overlaps, but the prediction is special and differs -> 0
    assert f1("yes", "yes sir") == (0.0, 0.0, 0.0)
    assert f1("yes sir", "yes") == (0.0, 0.0, 0.0)  # gold special and differs -> 0
    assert f1("no answer", "noanswer") == (0.0, 0.0, 0.0)
    assert f1("Yes!", "yes") == (1.0, 1.0, 1.0)
    assert exact_match("yes", "yes sir") == 0.0


def test_partial_overlap_f1_by_hand():
    # pred "eiffel tower in paris" (4 tokens), gold "eiffel tower" (2): common 2 -> P 1/2, R 1
    score, p, r = f1("the Eiffel Tower in Paris", "Eiffel Tower")
    assert (p, r) == (0.5, 1.0)
    assert score == pytest.approx(2 / 3)
    # multiset overlap: new x2 + york -> 3 common of 4 and 4
    assert f1("New York City New", "new york new jersey") == pytest.approx((0.75, 0.75, 0.75))
    assert f1("Berlin", "Paris") == (0.0, 0.0, 0.0)
    assert f1("", "") == (0.0, 0.0, 0.0)  # official script: no common token -> 0
    assert exact_match("", "the") == 1.0


def test_best_over_aliases_takes_each_max():
    # vs "john f kennedy": P 1, R 2/3 -> F1 0.8; vs "kennedy": P 1/2, R 1 -> F1 2/3
    got = best_over_aliases("John Kennedy", ["John F. Kennedy", "Kennedy"])
    assert got["em"] == 0.0
    assert got["f1"] == pytest.approx(0.8)
    assert best_over_aliases("JFK", ["John F. Kennedy", "J.F.K."]) == {"em": 1.0, "f1": 1.0}
    assert best_over_aliases("anything", []) == {"em": 0.0, "f1": 0.0}


# ---------------------------------------------------------------- retrieval


def test_recall_at_k_by_doc_id():
    retrieved = [["d1", "d2", "d3"], ["d4", "d5"]]
    gold = ["d2", "d5", "d9"]
    assert recall_at_k(retrieved, gold, 1) == 0.0
    assert recall_at_k(retrieved, gold, 2) == pytest.approx(2 / 3)
    assert recall_at_k(retrieved, gold, 10) == pytest.approx(2 / 3)
    assert recall_at_k(["d2", "d1"], ["d1"], 1) == 0.0  # a flat list is one ranking
    assert recall_at_k(["d2", "d1"], ["d1", "d1"], 2) == 1.0  # gold ids are a set
    assert recall_at_k([], ["d1"], 3) == 0.0
    with pytest.raises(ValueError):
        recall_at_k(retrieved, [], 1)
    with pytest.raises(ValueError):
        recall_at_k(retrieved, gold, 0)


def test_hop_recall_at_1():
    assert hop_recall_at_1(["a", ["b", "x"], []], ["a", "x", "c"]) == pytest.approx(1 / 3)
    assert hop_recall_at_1(["a"], ["a", "b"]) == 0.5  # unreached hop is a miss
    assert hop_recall_at_1(["a", "b", "c"], ["a", "b"]) == 1.0  # extra hops ignored
    assert hop_recall_at_1(["b", "a"], ["a", "b"]) == 0.0  # hop-aligned, unlike recall_at_k
    with pytest.raises(ValueError):
        hop_recall_at_1(["a"], [])


def test_mean_reciprocal_rank():
    retrieved = [["x", "g1"], ["g2"], ["y", "z"]]
    gold = ["g1", "g2", "g3"]
    assert mean_reciprocal_rank(retrieved, gold) == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert mean_reciprocal_rank(retrieved, gold, k=1) == pytest.approx(1 / 3)
    assert mean_reciprocal_rank([["x", "b", "a"]], [{"a", "b"}]) == 0.5  # first relevant counts
    with pytest.raises(ValueError):
        mean_reciprocal_rank(retrieved, gold[:2])


# ---------------------------------------------------------------- entity linking


def test_el_exact_hit():
    s = el_scores([[(0, 5, "Q1")]], [[(0, 5, "Q1")]])
    assert (s["tp"], s["fp"], s["fn"]) == (1, 0, 0)
    assert (s["precision"], s["recall"], s["f1"]) == (1.0, 1.0, 1.0)
    assert s["md_f1"] == 1.0


def test_el_off_by_one_span_is_a_miss():
    s = el_scores([[(0, 4, "Q1")]], [[(0, 5, "Q1")]])
    assert (s["tp"], s["fp"], s["fn"]) == (0, 1, 1)
    assert (s["md_tp"], s["md_fp"], s["md_fn"]) == (0, 1, 1)
    assert s["f1"] == 0.0


def test_el_right_span_wrong_entity_is_fp_and_fn():
    s = el_scores([[(0, 5, "Q2")]], [[(0, 5, "Q1")]])
    assert (s["tp"], s["fp"], s["fn"]) == (0, 1, 1)
    assert (s["md_tp"], s["md_fp"], s["md_fn"]) == (1, 0, 0)  # the span itself was found


def test_el_duplicate_prediction_one_tp_one_fp():
    s = el_scores([[(0, 5, "Q1"), (0, 5, "Q1")]], [[(0, 5, "Q1")]])
    assert (s["tp"], s["fp"], s["fn"]) == (1, 1, 0)
    assert s["precision"] == 0.5 and s["recall"] == 1.0
    assert s["f1"] == pytest.approx(2 / 3)
    assert (s["md_tp"], s["md_fp"]) == (1, 1)


def test_el_overlapping_spans_scored_separately():
    # "New York Times" (0, 14) with the nested "New York" (0, 8)
    s = el_scores([[(0, 14, "Q9684"), (0, 8, "Q60")]], [[(0, 14, "Q9684")]])
    assert (s["tp"], s["fp"], s["fn"]) == (1, 1, 0)
    s = el_scores([[(0, 14, "Q9684"), (0, 8, "Q60")]], [[(0, 8, "Q60"), (0, 14, "Q9684")]])
    assert (s["tp"], s["fp"], s["fn"]) == (2, 0, 0)


def test_el_nil_gold_ignored_for_linking_counted_for_md():
    golds = [[(0, 5, NIL_ID), (10, 15, "Q1"), (20, 25, NIL_ID)]]
    s = el_scores([[(0, 5, "Q7"), (10, 15, "Q1")]], golds)
    assert (s["tp"], s["fp"], s["fn"], s["nil_ignored"]) == (1, 0, 0, 1)  # unfound NIL gold: no FN
    assert (s["precision"], s["recall"]) == (1.0, 1.0)
    assert (s["md_tp"], s["md_fp"], s["md_fn"]) == (2, 0, 1)
    # a predicted NIL is not a linking prediction but is a detected mention
    s = el_scores([[(0, 5, NIL_ID), (10, 15, NIL_ID)]], golds)
    assert (s["tp"], s["fp"], s["fn"], s["nil_ignored"]) == (0, 0, 1, 0)
    assert s["md_tp"] == 2
    # a NIL gold absorbs one prediction; the second on that span is a FP
    s = el_scores([[(0, 5, "Q7"), (0, 5, "Q8")]], [[(0, 5, NIL_ID)]])
    assert (s["tp"], s["fp"], s["fn"], s["nil_ignored"]) == (0, 1, 0, 1)


def test_el_empty_predictions_no_division_by_zero():
    s = el_scores([[]], [[(0, 5, "Q1")]])
    assert (s["precision"], s["recall"], s["f1"]) == (0.0, 0.0, 0.0)
    assert (s["tp"], s["fp"], s["fn"]) == (0, 0, 1)
    s = el_scores([[]], [[]])
    assert (s["precision"], s["recall"], s["f1"], s["md_f1"]) == (0.0, 0.0, 0.0, 0.0)


def test_el_micro_over_documents_and_mention_objects():
    from data_prep.records import Mention

    preds = [[(0, 1, "A"), (2, 3, "B"), (4, 5, "C")], [(0, 1, "A")]]
    golds = [[Mention(0, 1, "A"), Mention(2, 3, "B"), Mention(4, 5, "C")], [Mention(0, 1, "Z")]]
    s = el_scores(preds, golds)
    # micro: 3 TP, 1 FP, 1 FN -> P = R = 3/4 (macro precision would be (1 + 0) / 2)
    assert (s["tp"], s["fp"], s["fn"]) == (3, 1, 1)
    assert s["precision"] == 0.75 and s["recall"] == 0.75
    # a match is per document: the same triple in another document does not count
    s = el_scores([[], [(0, 1, "A")]], [[(0, 1, "A")], []])
    assert (s["tp"], s["fp"], s["fn"]) == (0, 1, 1)
    with pytest.raises(ValueError):
        el_scores([[]], [[], []])


# ---------------------------------------------------------------- aggregate


def test_aggregate_ignores_missing_keys():
    records = [
        {"em": 1.0, "f1": 0.5, "recall@1": 1.0},
        {"em": 0.0, "f1": 1.0, "recall": 0.5},
        {"em": True, "f1": None, "other": 7},
    ]
    got = aggregate(records)
    assert got["em"] == pytest.approx(2 / 3)
    assert got["f1"] == pytest.approx(0.75)  # None is missing, not 0
    assert got["recall@1"] == 1.0 and got["recall"] == 0.5
    assert "other" not in got and "mrr" not in got
    assert got["n"] == 3
    assert got["counts"] == {"em": 3, "f1": 2, "recall": 1, "recall@1": 1}
    assert aggregate(records, keys=["other"]) == {"other": 7.0, "n": 3, "counts": {"other": 1}}
    assert aggregate([]) == {"n": 0, "counts": {}}
