"""Sharded evaluation runs (evaluation.run_shards): N shards then a merge give the one-process run's
predictions and metrics (timings aside); a shard made for another request is refused by the merge."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from evaluation.config import RunConfig
from evaluation.index import build_index
from evaluation.run import run_eval
from evaluation.sharding import shard_dir, shards_dir
from onegen.errors import ConfigError, ManifestMismatch
from tests.eval_fixtures import ROOT, random_model, world  # noqa: F401
from tests.train_fixtures import env

TIMING = {"wall_s", "tokens_per_s", "s_per_question", "sharded", "gen_s"}


def _untimed(obj):
    """``obj`` without the keys that measure time (they differ between any two runs)."""
    if isinstance(obj, dict):
        return {k: _untimed(v) for k, v in obj.items() if k not in TIMING}
    if isinstance(obj, list):
        return [_untimed(v) for v in obj]
    return obj


def _rounded(obj, digits: int):
    if isinstance(obj, dict):
        return {k: _rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rounded(v, digits) for v in obj]
    return round(obj, digits) if isinstance(obj, float) else obj


def _results(out, digits: int | None = None) -> tuple[list[dict], dict]:
    """Predictions and metrics without timings; floats rounded to ``digits`` (runs with other thread
    counts sum in another order: scores then differ in the last bits)."""
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    got = _untimed(preds), _untimed(json.loads((out / "metrics.json").read_text()))
    return got if digits is None else (_rounded(got[0], digits), _rounded(got[1], digits))


@pytest.fixture(scope="module")
def indexes(random_model, world, tmp_path_factory):  # noqa: F811
    base = tmp_path_factory.mktemp("shard_idx")
    return {name: build_index(random_model, world / name, base / name, progress=False) and base / name
            for name in ("rag_dev", "el_dev")}


def _req(model, world, data, method, out, indexes, **kw) -> RunConfig:
    own = method in ("onegen", "two-pass") or data == "el_dev"
    return RunConfig(model=model, data=world / data, method=method, index=indexes[data] if own else None, out=out,
                     max_examples=7, max_new_tokens=12, force_retrieval_every=None if data == "el_dev" else 4,
                     tracking=False, progress=False, **kw)


@pytest.mark.parametrize("data,method", [("rag_dev", "onegen"), ("rag_dev", "pipeline-bm25"), ("el_dev", "onegen")])
def test_shards_then_merge_equal_the_one_process_run(data, method, random_model, world, indexes, tmp_path):  # noqa: F811
    log = lambda m: None  # noqa: E731
    one = run_eval(_req(random_model, world, data, method, tmp_path / "one", indexes), log=log)
    out = tmp_path / "three"
    for i in (2, 0, 1):
        assert run_eval(_req(random_model, world, data, method, out, indexes, shard=f"{i}/3"), log=log) is None
    merged = run_eval(_req(random_model, world, data, method, out, indexes, merge=3), log=log)
    assert merged is not None and one is not None
    assert _results(out) == _results(tmp_path / "one")
    assert merged.metrics["sharded"]["shards"] == 3 and len(merged.metrics["sharded"]["gen_s"]) == 3
    assert merged.metrics["headline"]["n"] == 7 and not shards_dir(out).exists()
    assert json.loads((out / "manifest.json").read_text())["n"] == 7


def test_a_shard_is_kept_and_a_foreign_one_refused(random_model, world, indexes, tmp_path):  # noqa: F811
    said: list[str] = []
    out = tmp_path / "run"
    req = lambda **kw: _req(random_model, world, "rag_dev", "onegen", out, indexes, **kw)  # noqa: E731
    run_eval(req(shard="0/2"), log=said.append)
    stamp = (shard_dir(out, 0, 2) / "manifest.json").stat().st_mtime_ns
    run_eval(req(shard="0/2"), log=said.append)
    assert "shard 0/2 of" in said[-1] and "complete, kept" in said[-1]
    assert (shard_dir(out, 0, 2) / "manifest.json").stat().st_mtime_ns == stamp
    with pytest.raises(ConfigError, match=r"shard\(s\) \[1\] of 2 are missing"):
        run_eval(req(merge=2), log=said.append)
    run_eval(req(shard="1/2", max_hops=2), log=said.append)
    with pytest.raises(ManifestMismatch, match=r"shard-00001-of-00002 was made for another run \(differs in: max_hops\)"):
        run_eval(req(merge=2), log=said.append)
    with pytest.raises(ConfigError, match="needs --index"):
        run_eval(RunConfig(model=random_model, data=world / "rag_dev", method="onegen", shard="0/2", out=out,
                           tracking=False, progress=False), log=said.append)
    with pytest.raises(ConfigError, match="separate steps"):
        run_eval(req(shard="0/2", merge=2), log=said.append)


@pytest.mark.slow
def test_two_ranks_under_torchrun_give_the_one_process_run(random_model, world, indexes, tmp_path):  # noqa: F811
    args = ["--model", str(random_model), "--data", str(world / "rag_dev"), "--index", str(indexes["rag_dev"]),
            "--max-examples", "6", "--max-new-tokens", "12", "--force-retrieval-every", "4", "--no-mlflow", "--quiet"]
    one = subprocess.run([sys.executable, "-m", "evaluation", "run", *args, "--out", str(tmp_path / "one")], cwd=ROOT,
                         env=env(), capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                          "evaluation", "run", *args, "--out", str(tmp_path / "two")], cwd=ROOT, env=env(),
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    assert two.stdout.count("[eval] onegen: EM") == 1  # one merged run reports, not each rank
    assert _results(tmp_path / "two", 4) == _results(tmp_path / "one", 4)
