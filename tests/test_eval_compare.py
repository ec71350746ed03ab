"""``evaluation.compare`` over a hand-made MLflow store (no model): selection, formats, errors."""

from __future__ import annotations

import csv
import time

import pytest

from evaluation.compare import collect, compare, to_markdown
from evaluation.tracking import EvalTracker, metric_name, resolve_tracking_uri, sqlite_uri, train_link
from onegen.errors import ConfigError


def _eval_run(client, exp, method, model_fp, metrics, *, dataset="rag_dev", status="FINISHED", mode="onegen"):
    from mlflow.entities import Metric, Param

    run = client.create_run(exp, run_name=f"{method}:{dataset}", tags={
        "onegen.stage": "eval", "onegen.method": method, "onegen.dataset": dataset, "onegen.model": "tr/model",
        "onegen.mode": mode, "onegen.setting": "distractor"})
    now = int(time.time() * 1000)
    client.log_batch(run.info.run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()],
                     params=[Param("model_fingerprint", model_fp)])
    client.set_terminated(run.info.run_id, status=status)
    time.sleep(0.01)  # distinct start times: "latest" is well defined
    return run.info.run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from mlflow.tracking import MlflowClient

    base = tmp_path_factory.mktemp("cmp")
    uri = sqlite_uri(base / "mlflow.db")
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("onegen", artifact_location=(base / "art").as_uri())
    client.create_run(exp, run_name="train", tags={"onegen.stage": "train"})
    ids = {
        "old": _eval_run(client, exp, "onegen", "a" * 64, {"em": 0.1, "f1": 0.2, "n": 3}),
        "onegen": _eval_run(client, exp, "onegen", "a" * 64, {"em": 0.5, "f1": 0.6, "recall_at_1_free": 0.7,
                                                              "recall_at_1_tf": 0.8, "tokens_per_s": 100.0, "n": 3}),
        "git": _eval_run(client, exp, "onegen", "b" * 64, {"em": 0.3, "f1": 0.4, "n": 3}, mode="git"),
        "bm25": _eval_run(client, exp, "pipeline-bm25", "a" * 64, {"em": 0.2, "f1": 0.3, "recall_at_1_tf": 0.5, "n": 3}),
        "failed": _eval_run(client, exp, "two-pass", "a" * 64, {"em": 0.9}, status="FAILED"),
        "el": _eval_run(client, exp, "onegen", "a" * 64, {"el_f1": 0.42, "n": 2}, dataset="el_dev"),
    }
    return {"uri": uri, "client": client, "ids": ids, "base": base}


def test_collect_latest_finished_per_method_checkpoint_dataset(store):
    rows = collect(store["uri"], "onegen")
    got = {r["run_id"] for r in rows}
    ids = store["ids"]
    assert got == {ids["onegen"], ids["git"], ids["bm25"], ids["el"]}  # not the old, failed or training runs
    one = next(r for r in rows if r["run_id"] == ids["onegen"])
    assert one["EM"] == 0.5 and one["R@1 free"] == 0.7 and one["R@1 TF"] == 0.8 and one["tok/s"] == 100.0
    assert one["EL F1"] is None and one["mode"] == "onegen" and one["dataset"] == "rag_dev"
    # Method order within a dataset/model: onegen before the pipelines.
    rag = [r["method"] for r in rows if r["dataset"] == "rag_dev" and r["mode"] == "onegen"]
    assert rag == ["onegen", "pipeline-bm25"]
    assert {r["run_id"] for r in collect(store["uri"], "onegen", all_runs=True)} == set(ids.values())


def test_compare_writes_png_csv_markdown(store, tmp_path):
    from rich.console import Console

    console = Console(record=True, width=200)
    res = compare(store["uri"], "onegen", tmp_path / "c.png", console=console)
    text = console.export_text()
    assert "pipeline-bm25" in text and "0.420" in text and "–" in text and "R@1 free" in text
    assert res["png"].read_bytes()[:4] == b"\x89PNG"
    rows = list(csv.DictReader(res["csv"].open()))
    assert len(rows) == 4 and {"EM", "F1", "R@1 free", "R@1 TF", "EL F1", "tok/s", "run_id"} <= set(rows[0])
    md = res["md"].read_text().splitlines()
    assert md[0].startswith("| method | mode | model | dataset |") and set(md[1]) <= set("|-:") and len(md) == 6
    assert to_markdown([]).count("\n") == 2


def test_only_the_runs_of_the_given_checkpoints(store, tmp_path):
    """A benchmark rerun after its model was retrained logs to the same experiment: ``models`` keeps only the runs
    of the checkpoints named (by their manifest fingerprint), so an older model's rows do not join the table."""
    from onegen.manifest import write_manifest

    ids = store["ids"]
    got = {r["run_id"] for r in collect(store["uri"], "onegen", fingerprints={"b" * 64})}
    assert got == {ids["git"]}
    model = tmp_path / "train-git" / "model"
    model.mkdir(parents=True)
    write_manifest(model, "train", fingerprint="b" * 64)
    res = compare(store["uri"], "onegen", tmp_path / "c.png", models=[str(model)])
    assert [r["run_id"] for r in res["rows"]] == [ids["git"]]
    other = tmp_path / "retrained" / "model"
    other.mkdir(parents=True)
    write_manifest(other, "train", fingerprint="c" * 64)
    with pytest.raises(ConfigError, match="no finished eval run of .*retrained"):
        compare(store["uri"], "onegen", tmp_path / "x.png", models=[str(other)])


def test_compare_errors(store, tmp_path):
    with pytest.raises(ConfigError, match="no MLflow store"):
        collect(sqlite_uri(tmp_path / "missing.db"), "onegen")
    with pytest.raises(ConfigError, match="no experiment 'nope'"):
        collect(store["uri"], "nope")
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=store["uri"]).create_experiment("empty")
    with pytest.raises(ConfigError, match="no finished eval runs"):
        compare(store["uri"], "empty", tmp_path / "x.png")


def test_tracking_helpers(tmp_path, monkeypatch):
    assert metric_name("recall@5") == "recall_at_5"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None, tmp_path / "eval" / "r1") == sqlite_uri(tmp_path / "eval" / "mlflow.db")
    assert resolve_tracking_uri("http://127.0.0.1:5000", tmp_path) == "http://127.0.0.1:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////x/y.db")
    assert resolve_tracking_uri(None, tmp_path) == "sqlite:////x/y.db"
    # An export written by pipeline/train.py: run id in onegen_config.json, the store in OUTPUT/mlflow.db.
    out = tmp_path / "train_out"
    (out / "model").mkdir(parents=True)
    (out / "mlflow.db").write_bytes(b"")
    (out / "model" / "onegen_config.json").write_text('{"mlflow_run_id": "abc", "train_config": {"output_dir": "x"}}')
    assert train_link(out / "model") == ("abc", sqlite_uri(out / "mlflow.db"))
    assert resolve_tracking_uri("train", tmp_path, out / "model") == sqlite_uri(out / "mlflow.db")
    (tmp_path / "bare").mkdir()
    assert train_link(tmp_path / "bare") == (None, None)
    with pytest.raises(ConfigError, match="does not say where"):
        resolve_tracking_uri("train", tmp_path, tmp_path / "bare")


def test_tracker_degrades_when_mlflow_is_unreachable(tmp_path, capsys):
    t = EvalTracker(True, "http://127.0.0.1:9", "onegen", "r", {"onegen.stage": "eval"}, None)
    t.log_metrics({"em": 1.0})
    t.end()
    assert not t.ok and "MLflow is unavailable" in capsys.readouterr().err


# ---- the figure and the CIs (issue #14): the table's order, n, s/question, bootstrap CIs -----------

def _qs_run(client, exp, base, method, mode, em_hits, *, n=10, recall=None, predictions=True, lie=False):
    """An eval run like the quickstart's, with a predictions.jsonl artifact of ``em_hits`` of ``n`` right."""
    import json

    from mlflow.entities import Metric, Param

    records = [{"example_id": f"q{i}", "scores": {"em": float(i < em_hits), "f1": float(i < em_hits),
                                                   **({"hop_recall_at_1": float(i < recall)} if recall is not None else {})}}
               for i in range(n)]
    metrics = {"em": em_hits / n + (0.1 if lie else 0.0), "f1": em_hits / n, "s_per_question": 0.5 + em_hits / 10,
               "tokens_per_s": 99.0, "n": n}
    if recall is not None:
        metrics.update(recall_at_1_free=recall / n, recall_at_1_tf=0.9)
    run = client.create_run(exp, run_name=f"eval-{method}", tags={
        "onegen.stage": "eval", "onegen.method": method, "onegen.dataset": "rag_dev", "onegen.model": f"train-{mode}/model",
        "onegen.mode": mode, "onegen.setting": "distractor", "onegen.task": "rag"})
    client.log_batch(run.info.run_id, metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()],
                     params=[Param("model_fingerprint", mode * 8), Param("model_source", "tiny")])
    if predictions:
        path = base / run.info.run_id / "predictions.jsonl"
        path.parent.mkdir(parents=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        client.log_artifact(run.info.run_id, str(path))
    client.set_terminated(run.info.run_id)
    time.sleep(0.01)
    return records


def test_figure_and_table_follow_method_order_with_bootstrap_cis(tmp_path):
    from mlflow.tracking import MlflowClient
    from rich.console import Console

    from onegen.bootstrap import bootstrap_ci
    from evaluation.compare import METHOD_ORDER, figure_data

    uri = sqlite_uri(tmp_path / "mlflow.db")
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("quickstart", artifact_location=(tmp_path / "art").as_uri())
    # Logged in the quickstart's order (git checkpoint first): the old chart followed the checkpoint's name.
    _qs_run(client, exp, tmp_path, "pipeline-bm25", "git", 2, recall=5)
    _qs_run(client, exp, tmp_path, "pipeline-minilm", "git", 3, recall=6, lie=True)  # metrics.json != predictions
    _qs_run(client, exp, tmp_path, "no-retrieval", "git", 1)
    onegen = _qs_run(client, exp, tmp_path, "onegen", "onegen", 8, recall=10)
    _qs_run(client, exp, tmp_path, "two-pass", "onegen", 8, recall=10, predictions=False)

    res = compare(uri, "quickstart", tmp_path / "c.png", console=Console(record=True, width=250))
    rows = res["rows"]
    assert [r["method"] for r in rows] == METHOD_ORDER
    ci = bootstrap_ci([r["scores"]["em"] for r in onegen])
    assert rows[0]["ci"]["EM"] == ci and ci.low < 0.8 < ci.high and rows[0]["ci"]["R@1 free"].mean == 1.0
    assert rows[1]["ci"] == {}                    # two-pass: no predictions artifact, no interval
    assert set(rows[3]["ci"]) == {"F1", "R@1 free"}  # minilm's EM does not match its predictions: none drawn
    assert "R@1 TF" not in rows[0]["ci"]          # not kept per question

    fig = figure_data(rows, "quickstart")
    assert fig["methods"] == METHOD_ORDER
    assert fig["labels"][0] == "onegen\nonegen checkpoint" and fig["labels"][2] == "pipeline-bm25\ngit checkpoint"
    assert [p["column"] for p in fig["panels"]] == ["EM", "F1", "R@1 free", "R@1 TF", "s/q"]  # s/question, not tokens/s
    em = fig["panels"][0]
    assert em["values"] == [0.8, 0.8, 0.2, pytest.approx(0.4), 0.1]
    assert em["cis"][0] == (ci.low, ci.high) and em["cis"][1] is None
    assert fig["panels"][2]["values"][4] is None  # no-retrieval has no recall
    assert fig["title"] == "quickstart: tiny Llama (built from a config)"
    assert "n = 10 held-out questions per method" in fig["subtitle"] and "95% bootstrap CI" in fig["subtitle"]
    assert res["png"].read_bytes()[:4] == b"\x89PNG"

    md = res["md"].read_text().splitlines()
    assert md[2].startswith("| onegen |") and f"| {ci.fmt()} |" in md[2] and "| 0.800 |" in md[3]  # two-pass: bare
    header = res["csv"].read_text().splitlines()[0].split(",")
    assert header[-8:] == ["EM CI low", "EM CI high", "F1 CI low", "F1 CI high", "R@1 free CI low", "R@1 free CI high",
                           "run_id", "train_run_id"]


def test_cis_from_records_refuses_predictions_of_another_run():
    from evaluation.compare import cis_from_records

    records = [{"scores": {"em": 1.0, "f1": 0.5}}, {"scores": {"em": 0.0, "f1": 0.5}}]
    got = cis_from_records(records, {"EM": 0.5, "F1": 0.75, "R@1 free": None})
    assert set(got) == {"EM"} and got["EM"].low <= 0.5 <= got["EM"].high
