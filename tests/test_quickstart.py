"""The README's main command, at reduced size, end to end: prep → train (2 ranks, ZeRO-3) → 5 evaluations → MLflow → table."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from onegen import quickstart
from onegen import stages as stage_mod
from tests.train_fixtures import ROOT, env, quickstart_small_cmd

METHODS = ["onegen", "two-pass", "pipeline-bm25", "pipeline-minilm", "no-retrieval"]


@pytest.mark.slow
def test_quickstart_small_end_to_end(quickstart_small, tmp_path):
    out, p = quickstart_small
    summary = (out / "summary.md").read_text()
    tf = {}
    for m in METHODS:
        row = next(line for line in summary.splitlines() if line.startswith(f"| {m} |"))
        cells = [c.strip().split(" [")[0] for c in row.strip("|").split("|")]  # "0.800 [0.68, 0.90]" -> "0.800"
        generator, em, f1, r1 = cells[1], cells[3], cells[4], cells[5]
        assert generator == ("train-onegen" if m in ("onegen", "two-pass") else "train-git"), row
        for v in (em, f1):
            assert 0.0 <= float(v) <= 1.0, row
        if m != "no-retrieval":  # no retrieval has no Recall@1 by definition
            assert 0.0 <= float(r1) <= 1.0, row
            tf[m] = float(cells[6])
    assert "mlflow ui --backend-store-uri sqlite:///" in p.stdout
    assert "EM by question type" in summary and "without" in summary
    # the run can fail: OneGen's own [RQ] state retrieves held-out paragraphs (entities never seen in
    # training) better than BM25 on the same rows (teacher-forced; 0.78 vs 0.57 when measured), and
    # the generation loss fell
    assert tf["onegen"] > tf["pipeline-bm25"], summary
    rows = [json.loads(line) for line in (out / "train-onegen" / "metrics.jsonl").read_text().splitlines()]
    gen = [r["loss_gen"] for r in rows if "loss_gen" in r]
    assert gen[-1] < gen[0], gen
    # long stages show their progress bar (here, without a terminal, as a plain line)
    assert any(line.lstrip().startswith("train:") and "%|" in line for line in p.stdout.splitlines()), p.stdout[-3000:]
    # every run is in the MLflow store, training and evaluation
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")  # not set_tracking_uri: it exports an env var
    exp = client.get_experiment_by_name("quickstart-small")
    runs = client.search_runs([exp.experiment_id])
    names = {r.info.run_name for r in runs}
    assert {"train-onegen", "train-git"} | {f"eval-{m}" for m in METHODS} <= names, names
    assert all(r.info.status == "FINISHED" for r in runs)
    for plot in ("comparison.png", "train-onegen/training_curves.png", "train-git/training_curves.png"):
        assert (out / plot).stat().st_size > 1000, plot
    # each evaluation's headline metrics, as it finishes, whole lines (the model path keeps its beginning)
    for m in METHODS:
        assert any(line.strip().startswith(f"[eval] {m}: EM ") for line in p.stdout.splitlines()), m
    assert f"[train] model: {out / 'train-onegen' / 'model'}" in p.stdout
    # MLflow opens on the runs table: a machine-learning experiment, eval runs top-level, the URL printed
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert f"http://127.0.0.1:5000/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning" in p.stdout
    evals = [r for r in runs if r.info.run_name.startswith("eval-")]
    assert all("mlflow.parentRunId" not in r.data.tags and r.data.tags["onegen.train_run_id"] for r in evals)
    assert {r.data.tags["onegen.method"] for r in evals} == set(METHODS)

    # a rerun with the same options reuses every stage: no command runs (in a copy: the run is shared; the
    # stages record paths relative to the output dir, so a moved run is reused the same)
    out = tmp_path / "qs"
    shutil.copytree(quickstart_small[0], out, symlinks=True)
    cmd = quickstart_small_cmd(out)
    again = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("done before, same options") == 10 and "    $ " not in again.stdout, again.stdout[-3000:]
    assert json.loads((out / "summary.json").read_text())["methods"].keys() >= set(METHODS)

    # other --eval-examples: the evaluations (and the comparison) run again, training is reused
    fewer = subprocess.run(cmd + ["--eval-examples", "4"], cwd=ROOT, env=env(), capture_output=True, text=True,
                           timeout=1200)
    assert fewer.returncode == 0, fewer.stdout[-3000:] + fewer.stderr[-3000:]
    assert fewer.stdout.count("done before, same options") == 4  # world, train-onegen, train-git, index-onegen
    assert "eval-onegen was run with --eval-examples 20; this run asks for 4: running it again" in fewer.stdout
    assert all(json.loads((out / "eval" / m / "metrics.json").read_text())["headline"]["n"] == 4 for m in METHODS)

    # other --steps: refused, naming the option and the fix, before anything is touched
    model_fp = json.loads((out / "train-onegen" / "model" / "manifest.json").read_text())["fingerprint"]
    more = subprocess.run(cmd + ["--steps", "3"], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert more.returncode != 0
    assert "train-onegen was run with --steps 150; this run asks for 3: use another --out or delete" in more.stderr
    assert "    $ " not in more.stdout
    assert json.loads((out / "train-onegen" / "model" / "manifest.json").read_text())["fingerprint"] == model_fp


def test_quickstart_rejects_bad_steps_before_doing_anything(tmp_path):
    out = tmp_path / "qs"
    r = subprocess.run([sys.executable, "-m", "onegen.quickstart", "--steps", "0", "--out", str(out)],
                       cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--steps must be >= 1, got 0" in r.stderr
    assert not out.exists()


# ---- reuse: a stage is reused only with the same options (fake stages: each a python -c) ------------

_WRITE = ("import json, sys, pathlib; d = pathlib.Path(sys.argv[1]); d.mkdir(parents=True, exist_ok=True); "
          "(d / 'manifest.json').write_text(json.dumps({'fingerprint': sys.argv[2]})); "
          "open(sys.argv[3], 'a').write(d.name + '\\n')")


def _stages(out: Path, steps: int = 10, examples: int = 5, world: str = "w1") -> list:
    """world -> train (kept: refuses to be replaced) -> eval -> compare, as the quickstart chains them."""
    ran = str(out / "ran.txt")

    def st(name, d, fp, inputs, options, keep=False):
        cmd = [sys.executable, "-c", _WRITE, str(d), fp, ran]
        return stage_mod.Stage(name, f"stage {name}", cmd, d, done=[d / "manifest.json"], inputs=inputs,
                                options=options, keep=keep)

    return [st("world", out / "world", world, [], {"--small": True}),
            st("train-onegen", out / "train-onegen", f"model-{steps}", [out / "world"], {"--steps": steps}, keep=True),
            st("eval-onegen", out / "eval" / "onegen", f"eval-{examples}", [out / "train-onegen"],
               {"--eval-examples": examples}),
            st("compare", out / "cmp", "cmp", [out / "eval" / "onegen"], {})]


def _ran(out: Path) -> list[str]:
    p = out / "ran.txt"
    names = p.read_text().split() if p.exists() else []
    p.unlink(missing_ok=True)
    return names


def test_a_rerun_reuses_only_stages_with_the_same_options(tmp_path, capsys):
    out = tmp_path / "qs"
    stage_mod.run_stages(_stages(out), out)
    assert _ran(out) == ["world", "train-onegen", "onegen", "cmp"]
    record = json.loads((out / "train-onegen" / stage_mod.STAGE_RECORD).read_text())
    assert record["options"] == {"--steps": 10} and record["finished"] and record["inputs"] == {"<out>/world": "w1"}
    assert all(str(out) not in c for c in record["command"])  # where --out lies does not matter

    capsys.readouterr()
    stage_mod.run_stages(_stages(out), out)
    assert _ran(out) == [] and capsys.readouterr().out.count("done before, same options") == 4

    # another number of eval examples: the evaluation and what reads it run again, training is reused
    (out / "eval" / "onegen" / "stale.txt").write_text("from the old run")
    stage_mod.run_stages(_stages(out, examples=7), out)
    assert _ran(out) == ["onegen", "cmp"]
    assert "eval-onegen was run with --eval-examples 5; this run asks for 7: running it again" in capsys.readouterr().out
    assert not (out / "eval" / "onegen" / "stale.txt").exists()  # the old output is removed first


def test_a_trained_model_is_never_replaced_silently(tmp_path):
    out = tmp_path / "qs"
    stage_mod.run_stages(_stages(out), out)
    _ran(out)
    with pytest.raises(SystemExit) as e:
        stage_mod.run_stages(_stages(out, steps=3), out)
    msg = str(e.value)
    assert "train-onegen was run with --steps 10; this run asks for 3: use another --out or delete" in msg
    assert str(out / "train-onegen") in msg or "qs/train-onegen" in msg
    # the world would change under the trained model: refused before the world is touched
    with pytest.raises(SystemExit) as e:
        stage_mod.run_stages(_stages(out, world="w2"), out)
    assert "train-onegen was run on another <out>/world" in str(e.value)
    assert _ran(out) == [] and json.loads((out / "world" / "manifest.json").read_text())["fingerprint"] == "w1"


def test_an_interrupted_stage_with_the_same_options_resumes_in_place(tmp_path):
    out = tmp_path / "qs"
    stages = _stages(out)
    stage_mod.run_stages(stages, out)
    _ran(out)
    (out / "train-onegen" / "manifest.json").unlink()  # killed before the export
    (out / "train-onegen" / "checkpoint").write_text("kept")
    stage_mod.run_stages(_stages(out), out)
    assert _ran(out) == ["train-onegen"] and (out / "train-onegen" / "checkpoint").exists()


def test_effective_steps_reads_the_recipe_unless_overridden():
    recipe = ROOT / "configs" / "tiny-cpu.yaml"
    assert quickstart._effective_steps(recipe, []) == 300
    assert quickstart._effective_steps(recipe, ["optim.max_steps=6", "x=1", "optim.max_steps=10"]) == 10
