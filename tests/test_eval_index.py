"""The document index: round trip, approximate kinds, refusing another checkpoint's index, atomic build."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from evaluation import index as index_mod
from evaluation.index import DocIndex, build_index, open_index
from onegen.errors import ManifestMismatch
from pipeline.data import open_prepared
from tests.eval_fixtures import other_model, random_model, trained_model, world  # noqa: F401


@pytest.fixture(scope="module")
def rag_index(random_model, world, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("idx") / "rag_dev"
    manifest = build_index(random_model, world / "rag_dev", out, batch_size=16, progress=False)
    return out, manifest


def test_round_trip_self_retrieval(rag_index, random_model, world):  # noqa: F811
    out, man = rag_index
    assert sorted(p.name for p in out.iterdir()) == ["doc_ids.json", "embeddings.npy", "index.faiss", "manifest.json"]
    data = open_prepared(world / "rag_dev")
    model_fp = json.loads((random_model / "manifest.json").read_text())["fingerprint"]
    assert man["stage"] == "index" and man["kind"] == "flat" and man["metric"] == "ip"
    assert man["model_fingerprint"] == model_fp and man["prepared_fingerprint"] == data.fingerprint
    assert man["count"] == len(data.docs) and man["dim"] == 32

    idx = open_index(out, random_model)
    emb = np.load(out / "embeddings.npy", allow_pickle=False)
    assert emb.dtype == np.float32 and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    assert idx.doc_ids == list(data.docs["doc_id"])

    # Open setting: every document's own vector finds itself first (faiss over the whole index).
    hits = idx.search(emb, k=3)
    assert [h[0][0] for h in hits] == idx.doc_ids
    assert all(len(h) == 3 and h[0][1] >= h[1][1] >= h[2][1] for h in hits)

    # Distractor setting: only the candidates are scored, exactly, best first.
    row = data.query_rows([0])[0]
    cands = list(row["candidates"])
    q = idx.vector(cands[2])
    (got,) = idx.search(q[None], k=len(cands) + 5, restrict=[cands])
    assert got[0][0] == cands[2] and {d for d, _ in got} == set(cands) and len(got) == len(cands)
    want = sorted(((float(idx.vector(c) @ q), c) for c in cands), reverse=True)
    assert np.allclose([s for _, s in got], [s for s, _ in want], atol=1e-6)
    with pytest.raises(ManifestMismatch, match="not in the index"):
        idx.search(q[None], 1, restrict=[["no-such-doc"]])


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_kinds(kind, random_model, world, tmp_path):  # noqa: F811
    out = tmp_path / kind
    man = build_index(random_model, world / "el_dev", out, kind=kind, progress=False)
    idx = open_index(out, random_model)
    assert man["kind"] == kind and (kind != "ivf" or man["params"]["nlist"] == round(np.sqrt(man["count"])))
    emb = np.asarray(idx.embeddings)
    top = [h[0][0] for h in idx.search(emb, k=1)]
    assert np.mean([t == d for t, d in zip(top, idx.doc_ids)]) > 0.95


def test_refuses_index_of_another_checkpoint(rag_index, other_model):  # noqa: F811
    out, man = rag_index
    with pytest.raises(ManifestMismatch) as e:
        open_index(out, other_model)
    msg = str(e.value)
    other_fp = json.loads((other_model / "manifest.json").read_text())["fingerprint"]
    assert "built by checkpoint" in msg and man["model_fingerprint"][:12] in msg and other_fp[:12] in msg
    assert "rebuild the index" in msg


def test_interrupted_build_leaves_nothing_openable(random_model, world, tmp_path, monkeypatch):  # noqa: F811
    out = tmp_path / "idx"

    def killed(*a, **k):
        raise KeyboardInterrupt  # as if the process were interrupted after encoding, before the index

    monkeypatch.setattr(index_mod, "_make_faiss", killed)
    with pytest.raises(KeyboardInterrupt):
        build_index(random_model, world / "rag_dev", out, progress=False)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    monkeypatch.undo()

    build_index(random_model, world / "rag_dev", out, progress=False)
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(ManifestMismatch, match="no manifest.json"):
        open_index(copy)
    (out / "index.faiss").unlink()
    with pytest.raises(ManifestMismatch, match="incomplete"):
        open_index(out)
    # A rebuild replaces the damaged index in place.
    build_index(random_model, world / "rag_dev", out, progress=False)
    assert len(open_index(out, random_model)) == len(open_prepared(world / "rag_dev").docs)


def test_from_arrays_and_query_shape():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(6, 4)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    idx = DocIndex.from_arrays([f"d{i}" for i in range(6)], emb)
    assert idx.search(emb[4], 1)[0][0][0] == "d4"
    assert idx.search(emb[:2], 2, restrict=[["d1", "d5"], None])[0][0][0] == "d1"
    with pytest.raises(ValueError, match="dimension"):
        idx.search(np.zeros((1, 3), np.float32), 1)


@pytest.mark.slow
def test_index_of_trained_checkpoint(trained_model, world, tmp_path):  # noqa: F811
    out = tmp_path / "el"
    man = build_index(trained_model, world / "el_dev", out, progress=False)
    idx = open_index(out, trained_model)
    assert man["task"] == "el" and man["ret_tokens"] == ["[RD]", "[SE]"]
    top = [h[0][0] for h in idx.search(np.asarray(idx.embeddings), k=1)]
    assert np.mean([t == d for t, d in zip(top, idx.doc_ids)]) > 0.9  # duplicates of a name may tie


def test_documents_are_encoded_shortest_first_and_kept_in_docs_order(random_model, world, tmp_path, monkeypatch):  # noqa: F811
    import onegen.hidden as enc

    seen: list[list[int]] = []
    real = enc.encode_documents

    def spy(model, rows, pad_id, batch_size=64):
        seen.append([len(r) for r in rows])
        return real(model, rows, pad_id, batch_size)

    monkeypatch.setattr(enc, "encode_documents", spy)
    out = tmp_path / "sorted"
    build_index(random_model, world / "rag_dev", out, batch_size=2, progress=False)  # chunks of 32 docs
    data = open_prepared(world / "rag_dev")
    lengths = [n for chunk in seen for n in chunk]
    assert len(seen) == 2 and len(lengths) == len(data.docs)
    assert lengths == sorted(lengths) and lengths != [len(r) for r in data.docs["input_ids"]]  # all docs sorted, not per chunk
    # ... and each vector is still its own document's (row i = doc_ids[i], in docs/ order): a lone, unpadded forward.
    idx = open_index(out, random_model)
    assert idx.doc_ids == list(data.docs["doc_id"])
    from evaluation.runtime import load_runtime
    from onegen.hidden import hidden_at

    rt = load_runtime(random_model, data, device="cpu")
    for i in (0, 7, len(idx) - 1):
        row = data.docs[i]["input_ids"]
        alone = hidden_at(rt.model, [row], [[len(row) - 1]], rt.pad_id)[0][0]
        np.testing.assert_allclose(idx.embeddings[i], alone, atol=1e-5)


def test_subset_index_holds_the_rows_documents_and_says_so(rag_index, random_model, world, tmp_path):  # noqa: F811
    from evaluation.index_reuse import check_given_index, ensure_index, existing_index_ok
    from onegen.errors import ConfigError

    full_dir, full = rag_index
    data = open_prepared(world / "rag_dev")
    rows = data.query_rows([0, 1, 2])
    want = set().union(*(set(r["candidates"]) | set(r["positives"]) for r in rows))
    out = tmp_path / "sub"
    man = build_index(random_model, world / "rag_dev", out, rows=3, progress=False)
    assert man["subset"] == {"rows": 3, "docs": len(want), "of_docs": len(data.docs)} and man["count"] == len(want)
    assert full["subset"] is None and len(want) < len(data.docs)
    idx, whole = open_index(out, random_model), open_index(full_dir, random_model)
    assert idx.doc_ids == [d for d in data.docs["doc_id"] if d in want]  # docs/ order
    np.testing.assert_allclose(np.asarray(idx.embeddings), np.stack([whole.vector(d) for d in idx.doc_ids]), atol=1e-5)
    # The distractor setting of those rows is served exactly as by the full index; the open setting is refused.
    cands = list(rows[1]["candidates"])
    q = whole.vector(cands[0])[None]
    (got,), (ref,) = idx.search(q, 3, [cands]), whole.search(q, 3, [cands])
    assert [d for d, _ in got] == [d for d, _ in ref] and np.allclose([s for _, s in got], [s for _, s in ref], atol=1e-5)
    with pytest.raises(ManifestMismatch, match="subset index"):
        idx.search(q, 3)
    # Reuse: only for requests over at most those rows; a full index serves everything.
    fps = (man["model_fingerprint"], man["prepared_fingerprint"], "flat")
    assert existing_index_ok(out, *fps, None, rows=3) == (True, "complete")
    assert existing_index_ok(out, *fps, None, rows=2)[0] is True
    ok, why = existing_index_ok(out, *fps, None, rows=4)
    assert not ok and "subset index" in why and "first 4 rows" in why
    ok, why = existing_index_ok(out, *fps)
    assert not ok and "every document" in why
    assert existing_index_ok(full_dir, *fps, None, rows=3) == (True, "complete")
    prec = {"dtype": man["dtype"], "attn": man["attn"]}
    with pytest.raises(ManifestMismatch, match="subset index"):
        check_given_index(out, random_model, world / "rag_dev", data.manifest, prec, print, rows=None)
    check_given_index(out, random_model, world / "rag_dev", data.manifest, prec, print, rows=3)
    logs: list[str] = []
    man2, built = ensure_index(random_model, world / "rag_dev", out, log=logs.append, progress=False)  # a full run
    assert built and man2["subset"] is None and man2["count"] == len(data.docs)
    assert any("rebuilding, it is a subset index" in m for m in logs)
    # Entity-linking rows have no candidates: an index of "their own documents" is meaningless.
    with pytest.raises(ConfigError, match="no candidate paragraphs"):
        build_index(random_model, world / "el_dev", tmp_path / "el_sub", rows=2, progress=False)
