"""The real-benchmark command (#18): its recipe, its stages, its report, and a toy-size run end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from onegen import benchmark, benchmark_summary
from onegen.errors import ConfigError
from tests.train_fixtures import ROOT, env

METHODS = ["onegen", "two-pass", "pipeline-bm25", "pipeline-minilm", "no-retrieval"]


def _cfg(*over: str, recipe: str = "configs/benchmark/cpu.yaml"):
    return benchmark.load(benchmark._parse(["--config", recipe, *over]))


def test_recipes_load_and_gpu_differs_only_in_paths_model_and_sizes():
    cpu, gpu = _cfg(), _cfg(recipe="configs/benchmark/gpu.yaml")
    assert [s.kind for s in cpu.rag] == [s.kind for s in gpu.rag] and [s.name for s in cpu.rag] == [s.name for s in gpu.rag]
    assert cpu.eval.methods == gpu.eval.methods and cpu.train.mode == gpu.train.mode
    assert cpu.train.recipe != gpu.train.recipe


@pytest.mark.parametrize("over, needle", [
    (["eval.methods=[onegen,colbert]"], "unknown ['colbert']"),
    (["eval.methods=[two-pass]"], "must include onegen"),
    (["eval.normalization=ascii"], "not one of"),
])
def test_bad_recipe_values_are_refused_with_the_field(over, needle):
    with pytest.raises(ConfigError, match=None) as e:
        _cfg(*over)
    assert needle in str(e.value)


def test_duplicate_dataset_names_are_refused(tmp_path):
    recipe = tmp_path / "b.yaml"
    recipe.write_text("rag:\n  - {name: a, input: x.json}\n  - {name: a, input: y.json}\n")
    with pytest.raises(ConfigError, match="unique"):
        benchmark.load(benchmark._parse(["--config", str(recipe)]))


def test_a_missing_benchmark_file_names_it(tmp_path):
    cfg = _cfg(f"data_root={tmp_path}")
    with pytest.raises(ConfigError, match="2wiki_dev_sample500.json.gz does not exist"):
        benchmark.build_stages(cfg, tmp_path / "out")


@pytest.mark.shared_data
def test_train_and_heldout_parts_are_split_by_the_same_rule_and_only_training_parts_train(tmp_path, shared_data):
    cfg = _cfg(f"data_root={shared_data}")
    stages, layout = benchmark.build_stages(cfg, tmp_path)
    by = {s.name: s for s in stages}
    for name in ("2wiki", "hotpotqa", "reuters-128"):
        tr, he = by[f"prep-{name}-train"].cmd, by[f"prep-{name}-heldout"].cmd
        assert "holdout.part=train" in tr and "holdout.part=heldout" in he
        # the same input, fraction and seed on both sides: the split rule is one function of the id
        assert [c for c in tr if c.startswith(("holdout.fraction", "holdout.seed", "--input"))] == \
               [c for c in he if c.startswith(("holdout.fraction", "holdout.seed", "--input"))]
    assert not any(c.startswith("holdout.") for c in by["prep-kore50-eval"].cmd)
    train = next(c for c in by["train-onegen"].cmd if c.startswith("data.train="))
    assert [Path(d).name for d in train.split("=", 1)[1].strip("[]").split(",")] == \
        ["2wiki-train", "hotpotqa-train", "hotpotqa-train2", "reuters-128-train"]
    # extra_train: the whole other file trains (no split), and nothing of it is evaluated
    extra = by["prep-hotpotqa-train2"].cmd
    assert not any(c.startswith("holdout.") for c in extra) and extra[extra.index("--input") + 1].endswith(
        cfg.rag[1].extra_train[0].split("/")[-1])
    evaluated = [c for s in stages if s.name.startswith(("eval-", "index-")) for c in s.cmd]
    evaluated += [c for c in by["train-onegen"].cmd if c.startswith("data.eval=")]
    assert not any("hotpotqa-train2" in c for c in evaluated)
    assert by["train-onegen"].keep  # a trained model is never replaced silently
    assert "data.train_weights=[1.0,1.0,1.0,3.0]" in by["train-onegen"].cmd  # the CPU recipe: Reuters-128 × 3
    recipe = yaml.safe_load((ROOT / "configs" / "benchmark" / "cpu.yaml").read_text())
    recipe["el"][0]["train_weight"] = 1
    (tmp_path / "even.yaml").write_text(yaml.safe_dump(recipe))
    even = {s.name: s for s in benchmark.build_stages(
        _cfg(f"data_root={shared_data}", recipe=str(tmp_path / "even.yaml")), tmp_path)[0]}
    assert not any(c.startswith("data.train_weights") for c in even["train-onegen"].cmd)  # all 1: left out
    recipe["el"][0]["train_weight"], recipe["rag"][1]["train_weight"] = 3, 0.5
    (tmp_path / "weighted.yaml").write_text(yaml.safe_dump(recipe))
    weighted = {s.name: s for s in benchmark.build_stages(
        _cfg(f"data_root={shared_data}", recipe=str(tmp_path / "weighted.yaml")), tmp_path)[0]}
    assert "data.train_weights=[1.0,0.5,0.5,3.0]" in weighted["train-onegen"].cmd  # hotpotqa's two parts, then EL
    assert weighted["train-onegen"].options != by["train-onegen"].options  # a finished run is not reused for it
    evals = [s for s in stages if s.name.startswith("eval-")]
    assert len(evals) == 2 * len(METHODS) + 3 and {"index-2wiki", "index-hotpotqa"} <= set(by)
    assert all(str(tmp_path / "train-onegen" / "model") in s.cmd for s in evals)  # one generator for every method
    assert set(layout["rag"]) == {"2wiki", "hotpotqa"} and set(layout["el"]) == {"reuters-128", "kore50", "oke-2015"}


def _fake_eval(out: Path, name: str, method: str, head: dict, scores: list[dict]) -> None:
    d = out / "eval" / f"{name}-{method}"
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps({"headline": head}))
    (d / "predictions.jsonl").write_text("".join(json.dumps({"scores": s}) + "\n" for s in scores))


def test_bars_are_judged_from_the_measured_numbers(tmp_path):
    layout = {"rag": {"2wiki": ""}, "el": {"kore50": ""}, "methods": METHODS}
    tf = {"onegen": 0.6, "two-pass": 0.6, "pipeline-bm25": 0.7, "pipeline-minilm": 0.5, "no-retrieval": None}
    for m in METHODS:
        _fake_eval(tmp_path, "2wiki", m, {"em": 0.2 if m == "onegen" else 0.1, "recall_at_1_tf": tf[m], "n": 4},
                   [{"em": 1.0}, {"em": 0.0}, {"em": 0.0}, {"em": 0.0}])
    _fake_eval(tmp_path, "kore50", "onegen", {"el_link_acc_gold": 0.3, "el_name_match_acc_gold": 0.4, "kb_size": 9}, [])
    rag, el = benchmark_summary.rag_tables(tmp_path, layout), benchmark_summary.el_table(tmp_path, layout)
    bars = {b["bar"]: b["ok"] for b in benchmark_summary.check_bars(rag, el, {"2wiki": 0, "kore50": 2})}
    assert bars == {"2wiki: onegen R@1 tf > pipeline-bm25": False, "2wiki: onegen R@1 tf > pipeline-minilm": True,
                    "2wiki: onegen EM > no-retrieval": True, "kore50: onegen gold-mention link acc > name match": False,
                    "2wiki: no evaluated question is in training": True,
                    "kore50: no evaluated question is in training": False}
    lo, hi = rag["2wiki"]["onegen"]["ci"]["em"]  # EM 0.25 over 4 questions: a bootstrap interval around it
    assert 0.0 <= lo <= 0.25 <= hi <= 1.0


def _prepared(d: Path, task: str, ids: list[str]) -> str:
    d.mkdir(parents=True)
    (d / "manifest.json").write_text(json.dumps({"task": task}))
    (d / "split_ids.json").write_text(json.dumps({"part": "all", "ids": ids}))
    return str(d)


def test_questions_shared_by_training_and_evaluation_are_counted(tmp_path):
    # QA ids are the benchmarks' global ids: any QA training dir counts (an extra training file may hold a
    # held-out question). EL ids are positions in one file: only the dataset's own training part counts.
    layout = {"train_dirs": [_prepared(tmp_path / "hotpotqa-train", "rag", ["a", "b"]),
                             _prepared(tmp_path / "hotpotqa-train2", "rag", ["c", "q2"]),
                             _prepared(tmp_path / "reuters-128-train", "el", ["0", "1"])],
              "rag": {"hotpotqa": _prepared(tmp_path / "hotpotqa-heldout", "rag", ["q1", "q2"]),
                      "2wiki": _prepared(tmp_path / "2wiki-heldout", "rag", ["x"])},
              "el": {"reuters-128": _prepared(tmp_path / "reuters-128-heldout", "el", ["2", "3"]),
                     "kore50": _prepared(tmp_path / "kore50-eval", "el", ["0", "1"]),
                     "oke-2015": str(tmp_path / "missing")}}
    assert benchmark_summary.shared_questions(layout) == {"hotpotqa": 1, "2wiki": 0, "reuters-128": 0, "kore50": 0,
                                                          "oke-2015": None}


def test_quarantine_reasons_are_counted_by_kind_not_by_value():
    kind = benchmark_summary._reason_kind
    a = {"field": "supporting_facts[0][0]", "reason": "supporting fact points at paragraph 'Kansas Song', which is not in context"}
    b = {"field": "supporting_facts[2][0]", "reason": 'supporting fact points at paragraph "Homer\'s Odyssey", which is not in context'}
    c = {"field": "supporting_facts[1][1]", "reason": "sentence index 7 out of range: paragraph 'X' has 3 sentences"}
    assert kind(a) == kind(b) != kind(c)
    assert "Kansas" not in kind(a) and "paragraph '…'" in kind(a)


@pytest.mark.slow
@pytest.mark.shared_data
def test_toy_benchmark_end_to_end(tmp_path, shared_data):
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "onegen.benchmark", "--config", "configs/benchmark/toy.yaml", "--out", str(out),
           f"data_root={shared_data}"]
    p = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    s = json.loads((out / "summary.json").read_text())
    assert set(s["rag"]) == {"2wiki", "hotpotqa"} and set(s["el"]) == {"reuters-128", "kore50"}
    for name, rows in s["rag"].items():
        assert set(rows) == set(METHODS), name
        for method, row in rows.items():
            h = row["headline"]
            assert h["n"] == 3, (name, method)
            for key in ("em", "f1") + (() if method == "no-retrieval" else ("recall_at_1_tf", "recall_at_1_free")):
                assert 0.0 <= h[key] <= 1.0, (name, method, key, h.get(key))
            assert h["s_per_question"] > 0
            for lo, hi in row["ci"].values():
                assert 0.0 <= lo <= hi <= 1.0
    for name, h in s["el"].items():
        assert h["kb_size"] > 0 and 0.0 <= h["el_f1"] <= 1.0, name
        assert 0.0 <= h["el_link_acc_gold"] <= 1.0 and 0.0 <= h["el_name_match_acc_gold"] <= 1.0, name
    assert len(s["bars"]) == 2 * 3 + 2 + 4 and all(b["ok"] in (True, False) for b in s["bars"])
    assert all(b["ok"] for b in s["bars"] if "no evaluated question" in b["bar"])  # the split holds
    # the split is recorded in each prepared part's manifest, and no question is on both sides
    for name in ("2wiki", "hotpotqa"):
        ids = {}
        for part in ("train", "heldout"):
            man = json.loads((out / "data" / f"{name}-{part}" / "manifest.json").read_text())
            assert man["holdout"]["part"] == part
            ids[part] = {json.loads(x)["example_id"] for x in (out / "eval" / f"{name}-onegen" / "predictions.jsonl")
                         .read_text().splitlines()} if part == "heldout" else set(_split_ids(out / "data" / f"{name}-{part}"))
        assert ids["heldout"] and not ids["heldout"] & ids["train"], name
    md = (out / "summary.md").read_text()
    assert "## 2wiki" in md and "## Bars" in md and "## Wall time by stage" in md
    assert (out / "benchmark.png").stat().st_size > 5000 and (out / "comparison.png").exists()
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("benchmark-toy")
    names = {r.info.run_name for r in client.search_runs([exp.experiment_id])}
    assert {"train-onegen", "eval-2wiki-onegen", "eval-kore50-onegen"} <= names


def _split_ids(d: Path) -> list[str]:
    from pipeline.data import open_prepared

    return list(open_prepared(d).queries["example_id"])


@pytest.mark.shared_data
def test_the_pipelines_query_form_reaches_only_the_pipeline_evaluations(tmp_path, shared_data):
    stages, _ = benchmark.build_stages(_cfg(f"data_root={shared_data}", "eval.pipeline_query=lead"), tmp_path)
    flagged = {s.name for s in stages if "--pipeline-query" in s.cmd}
    assert flagged == {f"eval-{d}-{m}" for d in ("2wiki", "hotpotqa") for m in ("pipeline-bm25", "pipeline-minilm")}
    stages, _ = benchmark.build_stages(_cfg(f"data_root={shared_data}"), tmp_path)
    assert not any("--pipeline-query" in s.cmd for s in stages)  # the default keeps earlier runs' commands


@pytest.mark.shared_data
def test_the_comparison_holds_only_this_runs_model(tmp_path, shared_data):
    """Retraining in the same --out logs new eval runs beside the old model's: the compare stage names the model
    it trained, so the table holds that model's runs only."""
    stages, _ = benchmark.build_stages(_cfg(f"data_root={shared_data}"), tmp_path)
    compare = next(s for s in stages if s.name == "compare")
    assert f"models=[{tmp_path / 'train-onegen' / 'model'}]" in compare.cmd


def test_a_rerun_that_reused_stages_says_what_the_stages_took():
    full = benchmark_summary._wall_line(4900.0, {"train-onegen": 2442.0, "eval-2wiki-onegen": 193.0, "prep": None})
    assert full == "Wall time **81.7 min**."
    reused = benchmark_summary._wall_line(4.0, {"train-onegen": 2442.0, "eval-2wiki-onegen": 193.0, "compare": 3.0})
    assert reused.startswith("Wall time **0.1 min** for this invocation, which reused finished stages")
    assert "**44.0 min** when they ran" in reused
