"""bench/efficiency.py --quick: runs end to end, writes the CSV (expected columns, every method at every
point, identical generation work) and the two-panel PNG, and prints the ratios last.
bench/generation_batch.py: same answers at every generation batch size, speed-ups printed last."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.eval_fixtures import random_model, world  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent


def test_efficiency_quick(tmp_path):
    out = tmp_path / "eff"
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "efficiency.py"), "--quick", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = list(csv.DictReader((out / "efficiency.csv").open()))
    assert list(rows[0]) == ["sweep", "query_tokens", "retrievals", "method", "median_s", "min_s", "max_s", "repeats",
                             "context_tokens", "generator_forwards", "retriever_forwards", "ratio_vs_one_pass"]
    points = {(r["sweep"], r["query_tokens"], r["retrievals"]) for r in rows}
    assert points == {("query_length", "32", "1"), ("query_length", "64", "1"), ("retrievals", "32", "1"),
                      ("retrievals", "32", "2")}
    for pt in points:
        by = {r["method"]: r for r in rows if (r["sweep"], r["query_tokens"], r["retrievals"]) == pt}
        assert set(by) == {"one-pass", "two-pass", "pipeline"}
        assert float(by["one-pass"]["ratio_vs_one_pass"]) == 1.0 and all(float(r["median_s"]) > 0 for r in by.values())
        # Identical generation work (same context, same generator forwards); only the retrieval differs.
        assert len({r["context_tokens"] for r in by.values()}) == 1
        assert len({r["generator_forwards"] for r in by.values()}) == 1
        rounds, r_per = 5, int(pt[2])
        assert by["one-pass"]["retriever_forwards"] == "0"
        assert int(by["two-pass"]["retriever_forwards"]) == int(by["pipeline"]["retriever_forwards"]) == rounds * r_per
    assert (out / "efficiency.png").read_bytes()[:4] == b"\x89PNG"
    setup = json.loads((out / "efficiency.json").read_text())
    assert setup["rounds"] == 5 and setup["output_tokens"] == 10 and setup["doc_tokens"] == 30
    tail = p.stdout.strip().splitlines()
    assert tail[-1].startswith("At query length 64: two-pass takes") and "pipeline" in tail[-1]
    assert any("two-pass/one" in line for line in tail)


@pytest.mark.parametrize("dataset", ["rag_dev", "el_dev"])
def test_generation_batch_bench(random_model, world, dataset):  # noqa: F811
    """bench/generation_batch.py: same outputs at every batch size, rows/s per size, speed-ups last."""
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "generation_batch.py"), "--model", str(random_model),
                        "--data", str(world / dataset), "--n", "5", "--batch-sizes", "1", "2", "5",
                        "--max-new-tokens", "8", "--device", "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    lines = p.stdout.strip().splitlines()
    sizes = [line for line in lines if line.startswith("batch ")]
    assert [s.split(":")[0].split()[-1] for s in sizes] == ["1", "2", "5"]
    assert all(s.endswith("answers equal to batch 1: 5/5") for s in sizes)
    assert lines[-1].startswith("speed-up over batch 1: batch 2 ") and "batch 5 " in lines[-1]


@pytest.mark.slow
def test_index_scale_bench_small(tmp_path):
    """bench/index_scale.py at a small size: world, corpus, a 3-step checkpoint, 1/1-thread/2-rank encoding,
    every kind measured against flat with the model's own query states; the tables are written."""
    from tests.train_fixtures import env

    out = tmp_path / "scale"
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "index_scale.py"), "--out", str(out), "--entities", "3000",
                        "--steps", "3"], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads((out / "index_scale.json").read_text())
    for task in ("rag", "el"):
        enc, kinds = res[task]["encode"], res[task]["kinds"]
        assert enc["1 process"]["docs"] >= 3000 and enc["2 ranks"]["docs"] == enc["1 process"]["docs"]
        assert enc["speedup"] > 0 and res[task]["queries"] > 0
        assert list(kinds) == ["flat", "ivf", "ivfpq", "hnsw"]
        assert kinds["flat"]["recall10_vs_flat"] == 1.0 and kinds["flat"]["qps_vs_flat"] == 1.0
        assert all(0.0 <= k[m] <= 1.0 for k in kinds.values() for m in ("recall1_vs_flat", "recall10_vs_flat",
                                                                         "gold_recall1", "gold_recall10"))
        assert kinds["ivfpq"]["bytes_per_vector"] < kinds["flat"]["bytes_per_vector"]
    assert "| ivfpq |" in (out / "index_scale.md").read_text() and "docs/s" in p.stdout


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    from tests.train_fixtures import make_world

    return make_world(tmp_path_factory.mktemp("world"))


@pytest.mark.slow
def test_train_step_grad_cache_part(small_world):
    """bench/train_step.py's grad_cache part: one contrastive-batch size, with and without caching."""
    from tests.train_fixtures import env

    p = subprocess.run([sys.executable, str(ROOT / "bench" / "train_step.py"), "--part", "grad_cache", "--data",
                        str(small_world / "rag_train"), "--sizes", "4", "--steps", "3", "--chunk", "2"],
                       cwd=ROOT, env=env(), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    line = next(x for x in p.stdout.splitlines() if x.startswith("queries=  4"))
    assert "step memory" in line and "cached" in line and "s/step" in line


@pytest.mark.slow
def test_lora_curves_bench(small_world, tmp_path):
    """bench/lora_curves.py at a few steps: a plain-LM base, then full and LoRA fine-tuning from it, both
    evaluated at the same steps; the curves and the plot are written."""
    from tests.train_fixtures import env

    out = tmp_path / "curves"
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "lora_curves.py"), "--world", str(small_world), "--out",
                        str(out), "--base-steps", "3", "--steps", "4", "--eval-every", "2"],
                       cwd=ROOT, env=env(), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    curves = json.loads((out / "lora_curves.json").read_text())
    assert set(curves) == {"full fine-tuning", "LoRA"}
    assert [s for s, _ in curves["LoRA"]] == [s for s, _ in curves["full fine-tuning"]] == [2, 4]
    assert all(0.0 <= a <= 1.0 for pts in curves.values() for _, a in pts)
    assert (out / "lora_curves.png").stat().st_size > 0 and "trainable parameters" in p.stdout
