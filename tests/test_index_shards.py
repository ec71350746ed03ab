"""Sharded index builds (evaluation.index_shards): slices encoded apart, merged into the one-process index;
a killed shard redone alone; the approximate kinds' parameters (ivfpq)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from evaluation.config import IndexParams
from evaluation.index import DocIndex, _make_faiss, build_index, open_index
from evaluation.index_shards import encode_shard, merge_shards
from evaluation.sharding import parse_shard, shard_dir, shard_slice, shards_dir
from onegen.errors import ConfigError, ManifestMismatch
from tests.eval_fixtures import ROOT, other_model, random_model, world  # noqa: F401
from tests.train_fixtures import env

QUIET = {"progress": False, "log": lambda m: None}


def test_shard_slices_cover_every_document_once():
    for count in (0, 1, 7, 176):
        for n in (1, 2, 3, 5):
            parts = [list(range(count))[shard_slice(count, i, n)] for i in range(n)]
            assert sum(parts, []) == list(range(count)) and max(map(len, parts)) - min(map(len, parts)) <= 1
    assert parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "-1/2", "1", "a/b"):
        with pytest.raises(ConfigError, match="--shard"):
            parse_shard(bad)


def test_a_job_array_task_finds_its_shard(monkeypatch):
    for k in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(ConfigError, match="not a task of a SLURM job array"):
        parse_shard("array")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")  # sbatch --array=5-8
    assert parse_shard("array") == (2, 4)


def _same_index(a, b) -> None:
    ia, ib = open_index(a), open_index(b)
    assert ia.doc_ids == ib.doc_ids
    ea, eb = np.asarray(ia.embeddings), np.asarray(ib.embeddings)
    assert np.allclose(ea, eb, atol=1e-5)
    if ia.manifest.get("subset"):  # searched with each row's own candidates only: the vectors are the index
        return
    q = np.random.default_rng(0).standard_normal((50, ea.shape[1])).astype(np.float32)
    q = np.concatenate([q / np.linalg.norm(q, axis=1, keepdims=True), ea])
    assert [h[0][0] for h in ia.search(q, 1)] == [h[0][0] for h in ib.search(q, 1)]


def test_merged_shards_equal_the_one_process_build(random_model, world, tmp_path):  # noqa: F811
    one = tmp_path / "one"
    build_index(random_model, world / "el_dev", one, progress=False)
    out = tmp_path / "three"
    sizes = [encode_shard(random_model, world / "el_dev", out, i, 3, **QUIET)["count"] for i in (2, 0, 1)]
    assert sorted(sizes) == [58, 59, 59]
    man = merge_shards(out, 3, log=lambda m: None)
    assert man["sharded"]["shards"] == 3 and man["count"] == 176 and not shards_dir(out).exists()
    _same_index(one, out)
    # a subset index (the first rows' own documents) shards the same way
    sub = tmp_path / "sub"
    for i in range(2):
        encode_shard(random_model, world / "rag_dev", sub, i, 2, rows=5, **QUIET)
    man = merge_shards(sub, 2, log=lambda m: None)
    ref = build_index(random_model, world / "rag_dev", tmp_path / "sub1", rows=5, progress=False)
    assert man["subset"] == ref["subset"]
    _same_index(tmp_path / "sub1", sub)


def test_merge_refuses_missing_or_foreign_shards(random_model, other_model, world, tmp_path):  # noqa: F811
    out = tmp_path / "idx"
    encode_shard(random_model, world / "el_dev", out, 0, 2, **QUIET)
    with pytest.raises(ConfigError, match=r"shard\(s\) \[1\] of 2 are missing"):
        merge_shards(out, 2, log=lambda m: None)
    encode_shard(other_model, world / "el_dev", out, 1, 2, **QUIET)
    with pytest.raises(ManifestMismatch, match="disagrees with shard 0 on \\['model_fingerprint'\\]"):
        merge_shards(out, 2, log=lambda m: None)
    assert not out.exists()


def _cli(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "evaluation", "index", *args], cwd=ROOT, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _ok(p: subprocess.Popen) -> str:
    out = p.communicate(timeout=300)[0]
    assert p.returncode == 0, out[-3000:]
    return out


def test_a_killed_shard_is_redone_alone_and_the_index_is_the_same(random_model, world, tmp_path):  # noqa: F811
    base = ["--model", str(random_model), "--data", str(world / "el_dev"), "--batch-size", "1", "--quiet"]
    ref, out = tmp_path / "ref", tmp_path / "idx"
    for i in range(2):
        _ok(_cli(*base, "--out", str(ref), "--shard", f"{i}/2"))
    _ok(_cli(*base, "--out", str(ref), "--merge", "2"))

    _ok(_cli(*base, "--out", str(out), "--shard", "0/2"))
    kept = (shard_dir(out, 0, 2) / "manifest.json").stat().st_mtime_ns
    victim = _cli(*base, "--out", str(out), "--shard", "1/2")
    tmp_glob = f".{shard_dir(out, 1, 2).name}.tmp-*"
    deadline = time.time() + 120
    while not list(shards_dir(out).glob(tmp_glob)) and victim.poll() is None and time.time() < deadline:
        time.sleep(0.001)
    os.kill(victim.pid, signal.SIGSTOP)  # frozen mid-build, then killed: what SIGKILL of a rank leaves
    assert not shard_dir(out, 1, 2).exists(), "the shard finished before it could be killed"
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()

    again = [_ok(_cli(*base, "--out", str(out), "--shard", f"{i}/2")) for i in range(2)]
    assert "shard 0/2" in again[0] and "complete, kept" in again[0]
    assert "88 documents in" in again[1] and not list(shards_dir(out).glob(tmp_glob))
    assert (shard_dir(out, 0, 2) / "manifest.json").stat().st_mtime_ns == kept
    _ok(_cli(*base, "--out", str(out), "--merge", "2"))
    fp = [json.loads((d / "manifest.json").read_text())["fingerprint"] for d in (ref, out)]
    assert fp[0] == fp[1]


@pytest.mark.slow
def test_two_ranks_under_torchrun_build_and_merge(random_model, world, tmp_path):  # noqa: F811
    one, out = tmp_path / "one", tmp_path / "two"
    build_index(random_model, world / "el_dev", one, progress=False)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "evaluation", "index", "--model", str(random_model), "--data", str(world / "el_dev"),
                        "--out", str(out), "--quiet"], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "merged " in p.stdout and json.loads((out / "manifest.json").read_text())["sharded"]["shards"] == 2
    _same_index(one, out)
    again = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            "-m", "evaluation", "index", "--model", str(random_model), "--data", str(world / "el_dev"),
                            "--out", str(out), "--quiet"], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("reused") == 2, again.stdout[-2000:]


def test_ivfpq_compresses_and_keeps_its_parameters():
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((2000, 32)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    index, used = _make_faiss(emb, "ivfpq", IndexParams(pq_m=8))
    assert (used["pq_m"], used["pq_bits"], used["bytes_per_vector"]) == (8, 8, 16.0) and index.ntotal == 2000
    flat, used_flat = _make_faiss(emb, "flat", IndexParams())
    assert used_flat["bytes_per_vector"] == 128.0
    index.nprobe = used["nlist"]  # every list: what is left is the quantisation's own error
    top_pq = index.search(emb[:200], 10)[1]
    top = flat.search(emb[:200], 1)[1]
    assert np.mean([t[0] in row for t, row in zip(top, top_pq)]) > 0.8
    # through DocIndex (what a run searches): refine x k candidates re-scored exactly from the stored vectors
    ids = [f"d{i}" for i in range(len(emb))]
    q = emb[:200]
    refined = DocIndex(ids, emb, index, {"kind": "ivfpq", "params": used}).search(q, 10)
    raw = DocIndex(ids, emb, index, {"kind": "ivfpq", "params": {**used, "refine": 1}}).search(q, 10)

    def gap(hits) -> float:  # how far the returned scores are from the exact inner products
        return max(abs(s - float(emb[int(d[1:])] @ q[i])) for i, h in enumerate(hits) for d, s in h)

    assert gap(refined) < 1e-5 < gap(raw)
    overlap = [np.mean([len({d for d, _ in a} & set(ids_row)) / 10 for a, ids_row in zip(hits, (np.asarray(ids)[flat.search(q, 10)[1]]))])
               for hits in (refined, raw)]
    assert overlap[0] >= overlap[1] and overlap[0] > 0.95, overlap
    with pytest.raises(ConfigError, match="pq_m=5 does not divide the dimension 32"):
        _make_faiss(emb, "ivfpq", IndexParams(pq_m=5))
    with pytest.raises(ConfigError, match="too few"):
        _make_faiss(emb[:100], "ivfpq", IndexParams())
