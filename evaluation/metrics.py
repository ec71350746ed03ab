"""Metrics for OneGen (design §6): answer EM/F1, retrieval by document id, entity linking.

Pure functions over plain Python values (stdlib only), so any stage can import them cheaply.

Answer normalisation follows the official HotpotQA script (lower-case, delete punctuation, drop the
articles a/an/the as whole words, collapse whitespace) with two documented Unicode extensions:

* the text is NFC-normalised, so a composed "ö" and "o" + combining diaeresis compare equal;
  accents are *kept* ("Röntgen" != "Rontgen"), as in the official script;
* every Unicode punctuation character (general category ``P*``: curly quotes ’ “ ”, dashes – —,
  guillemets « », ¿ ¡ ...) is deleted like ``string.punctuation``, so "O’Brien" == "O'Brien" and
  "1990–1995" == "1990-1995". Non-ASCII symbols (category ``S*``, e.g. "€", "°") are kept.

``normalization="official"`` (``evaluation run --normalization official``) drops both extensions and
scores exactly as the official HotpotQA evaluation script: lower-case, delete the ASCII punctuation
of ``string.punctuation`` only, drop a/an/the, collapse whitespace — no NFC ("Ro\u0308ntgen" !=
"Röntgen") and Unicode punctuation kept ("O’Brien" -> "o’brien" != "obrien"); F1's yes/no/noanswer
rule is the same in both. Use it for numbers comparable with published HotpotQA/2Wiki results; the
default is kinder to generated text with typographic quotes and dashes.
"""

from __future__ import annotations

import math
import re
import string
import unicodedata
from collections import Counter
from typing import Any, Hashable, Iterable, Mapping, Sequence

# Answer normalisations (``evaluation run --normalization``): ours, and the official HotpotQA script's.
from evaluation.config import NORMALIZATIONS

# Kept equal to data_prep.records.NIL_ID (a test checks it); duplicated so that importing the
# metrics never pulls in data_prep.
NIL_ID = "<NIL>"

_ASCII_PUNCT = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_SPECIAL_ANSWERS = frozenset({"yes", "no", "noanswer"})


# --------------------------------------------------------------------------------------------
# Answers
# --------------------------------------------------------------------------------------------


def _is_punct(ch: str) -> bool:
    return ch in _ASCII_PUNCT or (ord(ch) > 127 and unicodedata.category(ch).startswith("P"))


def _check_normalization(normalization: str) -> None:
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization {normalization!r}: choose one of {list(NORMALIZATIONS)}")


def normalize_answer(s: str, normalization: str = "default") -> str:
    """HotpotQA normalisation: NFC, lower-case, delete punctuation, drop a/an/the, collapse spaces.

    Punctuation is deleted (not replaced by a space), as in the official script: "well-known" ->
    "wellknown". Deleting it before dropping articles means "the." is dropped too.
    ``normalization="official"``: no NFC, and only ``string.punctuation`` is deleted (the official
    script exactly; see the module docstring).
    """
    _check_normalization(normalization)
    if normalization == "official":
        s = "".join(ch for ch in s.lower() if ch not in _ASCII_PUNCT)
    else:
        s = unicodedata.normalize("NFC", s.lower())
        s = "".join(ch for ch in s if not _is_punct(ch))
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(prediction: str, gold: str, normalization: str = "default") -> float:
    """1.0 iff the normalised prediction equals the normalised gold, else 0.0."""
    return float(normalize_answer(prediction, normalization) == normalize_answer(gold, normalization))


def f1(prediction: str, gold: str, normalization: str = "default") -> tuple[float, float, float]:
    """Token F1 over normalised whitespace tokens; returns ``(f1, precision, recall)``.

    common = |tokens(pred) ∩ tokens(gold)| as multisets; precision = common / |tokens(pred)|,
    recall = common / |tokens(gold)|, F1 = their harmonic mean. HotpotQA rule: if either
    normalised string is "yes", "no" or "noanswer" and the two differ, the result is (0, 0, 0).
    No common token (including both empty) gives (0, 0, 0), as in the official script.
    """
    p, g = normalize_answer(prediction, normalization), normalize_answer(gold, normalization)
    if (p in _SPECIAL_ANSWERS or g in _SPECIAL_ANSWERS) and p != g:
        return 0.0, 0.0, 0.0
    p_toks, g_toks = p.split(), g.split()
    common = sum((Counter(p_toks) & Counter(g_toks)).values())
    if common == 0:
        return 0.0, 0.0, 0.0
    precision = common / len(p_toks)
    recall = common / len(g_toks)
    return 2 * precision * recall / (precision + recall), precision, recall


def best_over_aliases(prediction: str, aliases: Iterable[str], normalization: str = "default") -> dict[str, float]:
    """``{"em": max EM, "f1": max F1}`` over the gold aliases (2Wiki); each max is taken separately.

    No aliases gives 0.0 for both.
    """
    em_best, f1_best = 0.0, 0.0
    for alias in aliases:
        em_best = max(em_best, exact_match(prediction, alias, normalization))
        f1_best = max(f1_best, f1(prediction, alias, normalization)[0])
    return {"em": em_best, "f1": f1_best}


# --------------------------------------------------------------------------------------------
# Retrieval (always by document id, never by "answer string appears in the passage")
# --------------------------------------------------------------------------------------------


def recall_at_k(retrieved: Sequence[Sequence[str]] | Sequence[str], gold: Iterable[str], k: int) -> float:
    """Fraction of one question's distinct gold doc ids found in the top-k of any of its queries.

    ``retrieved`` holds one ranked list of doc ids per retrieval query of the question (one per
    ``[RQ]``); a flat list of ids is taken as a single ranking. recall@k =
    |gold ∩ ⋃_q top_k(retrieved[q])| / |gold|. Order of the queries does not matter (see
    :func:`hop_recall_at_1` for the hop-aligned measure). Empty gold or k < 1 raises ValueError.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    gold_set = set(gold)
    if not gold_set:
        raise ValueError("recall is undefined without gold document ids")
    rankings = [retrieved] if retrieved and isinstance(retrieved[0], str) else retrieved
    found: set[str] = set()
    for ranking in rankings:
        found.update(ranking[:k])
    return len(gold_set & found) / len(gold_set)


def hop_recall_at_1(
    predicted_doc_ids_per_hop: Sequence[str | Sequence[str] | None], gold_doc_ids_per_hop: Sequence[str]
) -> float:
    """Fraction of gold hops whose top-1 retrieved doc id is that hop's gold doc id.

    Hop i is a hit iff the prediction for hop i (a doc id, or a ranked list whose first element is
    used) equals ``gold_doc_ids_per_hop[i]``. The denominator is the number of gold hops: hops the
    model never reached (prediction list shorter, an empty ranking, or None) are misses; extra
    predicted hops are ignored. Empty gold raises ValueError.
    """
    if not gold_doc_ids_per_hop:
        raise ValueError("hop recall is undefined without gold hops")
    hits = 0
    for i, gold_id in enumerate(gold_doc_ids_per_hop):
        pred = predicted_doc_ids_per_hop[i] if i < len(predicted_doc_ids_per_hop) else None
        if pred is not None and not isinstance(pred, str):
            pred = pred[0] if len(pred) else None
        hits += pred == gold_id
    return hits / len(gold_doc_ids_per_hop)


def mean_reciprocal_rank(
    retrieved: Sequence[Sequence[str]], gold: Sequence[str | Iterable[str]], k: int | None = None
) -> float:
    """Mean over queries of 1 / (rank of the first relevant doc id), 0 if none is in the ranking.

    ``retrieved[i]`` is query i's ranked doc ids; ``gold[i]`` is its relevant doc id or a
    collection of relevant ids. Ranks are 1-based; with ``k`` only the top-k count (MRR@k).
    Zero queries or a length mismatch raises ValueError.
    """
    if len(retrieved) != len(gold):
        raise ValueError(f"{len(retrieved)} rankings but {len(gold)} gold entries")
    if not retrieved:
        raise ValueError("MRR is undefined over zero queries")
    total = 0.0
    for ranking, g in zip(retrieved, gold):
        relevant = {g} if isinstance(g, str) else set(g)
        for rank, doc_id in enumerate(ranking[:k] if k is not None else ranking, start=1):
            if doc_id in relevant:
                total += 1.0 / rank
                break
    return total / len(retrieved)


# --------------------------------------------------------------------------------------------
# Entity linking (GERBIL strong matching, micro-averaged over the corpus)
# --------------------------------------------------------------------------------------------


def _triple(m: Any) -> tuple[int, int, str]:
    if isinstance(m, (tuple, list)):
        start, end, entity_id = m[0], m[1], m[2]
    else:  # data_prep.records.Mention or anything with these attributes
        start, end, entity_id = m.start, m.end, m.entity_id
    return int(start), int(end), str(entity_id)


def _prf(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f


def _overlap(a: Counter, b: Counter) -> int:
    return sum((a & b).values())


def el_scores(
    predictions: Sequence[Iterable[Any]], golds: Sequence[Iterable[Any]], nil_id: str = NIL_ID
) -> dict[str, float]:
    """Micro entity-linking P/R/F1 with GERBIL strong matching, plus mention detection (MD).

    ``predictions[d]`` and ``golds[d]`` are document d's mentions as ``(start, end, entity_id)``
    tuples or objects with those attributes (``Mention``); offsets are compared exactly.

    Linking: a prediction is a true positive iff it has the same start, end and entity_id as a
    gold not yet matched; each gold and each prediction is matched at most once (so a duplicated
    prediction gives one TP and one FP). Overlapping predictions are each scored on their own.
    NIL handling ("ignore NIL"): gold mentions with ``entity_id == nil_id`` are not linking golds
    (never FN); a non-NIL prediction left unmatched whose span equals a NIL gold's span is ignored
    (neither TP nor FP), again one prediction per NIL gold; predictions whose entity_id is
    ``nil_id`` are not linking predictions. Every other unmatched prediction is a FP, every
    unmatched non-NIL gold a FN. A right span with a wrong entity is therefore one FP and one FN.

    MD: the same one-to-one matching on (start, end) alone, over all golds (NIL included) and all
    predictions (NIL-predicted included).

    precision = tp / (tp + fp), recall = tp / (tp + fn), F1 their harmonic mean; any 0/0 is 0.0.
    Returns precision, recall, f1, tp, fp, fn, nil_ignored and md_precision, md_recall, md_f1,
    md_tp, md_fp, md_fn. Different document counts raise ValueError.
    """
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predicted documents but {len(golds)} gold documents")
    tp = fp = fn = ignored = md_tp = md_fp = md_fn = 0
    for doc_preds, doc_golds in zip(predictions, golds):
        preds = [_triple(m) for m in doc_preds]
        gold = [_triple(m) for m in doc_golds]

        gold_link = Counter(t for t in gold if t[2] != nil_id)
        gold_nil_spans = Counter(t[:2] for t in gold if t[2] == nil_id)
        pred_link = Counter(t for t in preds if t[2] != nil_id)
        doc_tp = _overlap(pred_link, gold_link)
        leftover_spans: Counter = Counter()
        for t, n in (pred_link - gold_link).items():
            leftover_spans[t[:2]] += n
        doc_ignored = _overlap(leftover_spans, gold_nil_spans)
        tp += doc_tp
        ignored += doc_ignored
        fp += sum(pred_link.values()) - doc_tp - doc_ignored
        fn += sum(gold_link.values()) - doc_tp

        pred_spans = Counter(t[:2] for t in preds)
        gold_spans = Counter(t[:2] for t in gold)
        doc_md_tp = _overlap(pred_spans, gold_spans)
        md_tp += doc_md_tp
        md_fp += len(preds) - doc_md_tp
        md_fn += len(gold) - doc_md_tp

    precision, recall, f = _prf(tp, fp, fn)
    md_p, md_r, md_f = _prf(md_tp, md_fp, md_fn)
    return {
        "precision": precision, "recall": recall, "f1": f, "tp": tp, "fp": fp, "fn": fn,
        "nil_ignored": ignored,
        "md_precision": md_p, "md_recall": md_r, "md_f1": md_f,
        "md_tp": md_tp, "md_fp": md_fp, "md_fn": md_fn,
    }


# --------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------

DEFAULT_AGGREGATE_KEYS = ("em", "f1", "precision", "recall", "hop_recall_at_1", "mrr")
_RECALL_AT = re.compile(r"^recall@\d+$")


def aggregate(
    records: Sequence[Mapping[str, Any]], keys: Iterable[Hashable] | None = None
) -> dict[str, Any]:
    """Mean of each metric over the per-example records that carry it.

    ``keys`` defaults to em, f1, precision, recall, hop_recall_at_1, mrr and every ``recall@<k>``
    key seen. A record missing a key, or holding None/NaN for it, is left out of that key's mean
    (not counted as 0); bools count as 0/1. Returns ``{key: mean}`` for keys seen at least once,
    plus ``"n"`` (number of records) and ``"counts"`` (``{key: records averaged}``).
    """
    if keys is None:
        wanted = list(DEFAULT_AGGREGATE_KEYS)
        for r in records:
            wanted += [k for k in r if isinstance(k, str) and _RECALL_AT.match(k) and k not in wanted]
    else:
        wanted = list(keys)
    sums: dict[Hashable, float] = {}
    counts: dict[Hashable, int] = {}
    for r in records:
        for key in wanted:
            v = r.get(key)
            if v is None or (isinstance(v, float) and math.isnan(v)):
                continue
            sums[key] = sums.get(key, 0.0) + float(v)
            counts[key] = counts.get(key, 0) + 1
    out: dict[str, Any] = {key: sums[key] / counts[key] for key in wanted if key in counts}
    out["n"] = len(records)
    out["counts"] = {key: counts[key] for key in wanted if key in counts}
    return out
