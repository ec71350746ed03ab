"""``python -m evaluation``: index (resumable), run for every method (files + MLflow run linked to the
training run), entity linking, compare, and the refusals — on the tiny checkpoint + tiny world."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from evaluation.cli import main
from tests.eval_fixtures import other_model, random_model, trained_model, world  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
METHODS = ["onegen", "two-pass", "pipeline-bm25", "pipeline-minilm", "no-retrieval"]
PRED_KEYS = {"example_id", "question", "generated_text", "answer", "hops", "gold_answers", "gold_hops", "scores",
             "stop_reason", "n_generated", "wall_s"}
HEAD_KEYS = {"em", "f1", "recall_at_1_free", "recall_at_1_any", "recall_at_1_tf", "tokens_per_s", "s_per_question", "n"}


def _with_run_id(src: Path, dst: Path, run_id: str) -> Path:
    """A copy of a checkpoint export whose onegen_config.json names a training run (as pipeline.export writes)."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "onegen_config.json").read_text())
    cfg["mlflow_run_id"] = run_id
    (dst / "onegen_config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def env(random_model, world, tmp_path_factory):  # noqa: F811
    """One sqlite store holding a (fake) training run; a checkpoint linked to it and one linked elsewhere."""
    from mlflow.tracking import MlflowClient

    base = tmp_path_factory.mktemp("eval_cli")
    uri = f"sqlite:///{base / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("onegen", artifact_location=(base / "mlartifacts").as_uri())
    train = client.create_run(exp, run_name="train-tiny", tags={"onegen.stage": "train"})
    client.set_terminated(train.info.run_id)
    linked = _with_run_id(random_model, base / "linked" / "model", train.info.run_id)
    elsewhere = _with_run_id(random_model, base / "elsewhere" / "model", "0" * 32)
    return {"base": base, "uri": uri, "client": client, "train_run": train.info.run_id, "linked": linked,
            "elsewhere": elsewhere, "world": world}


@pytest.fixture(scope="module")
def runs(env):
    """Every RAG method once (3 questions, [RQ] forced so each method retrieves) + one EL run."""
    world, out = env["world"], {}
    assert main(["index", "--model", str(env["linked"]), "--data", str(world / "rag_dev"),
                 "--out", str(env["base"] / "index"), "--quiet"]) == 0
    for m in METHODS:
        argv = ["run", "--model", str(env["linked"]), "--data", str(world / "rag_dev"), "--method", m,
                "--max-examples", "3", "--max-new-tokens", "10", "--force-retrieval-every", "3", "--max-hops", "2",
                "--gen-batch-size", "2", "--out", str(env["base"] / m), "--tracking-uri", env["uri"], "--quiet"]
        if m == "onegen":
            argv += ["--index", str(env["base"] / "index")]
        assert main(argv) == 0, m
        out[m] = env["base"] / m
    assert main(["run", "--model", str(env["elsewhere"]), "--data", str(world / "el_dev"), "--method", "onegen",
                 "--max-examples", "2", "--max-new-tokens", "16", "--gen-batch-size", "2", "--out", str(env["base"] / "el"),
                 "--tracking-uri", env["uri"], "--quiet"]) == 0
    out["el"] = env["base"] / "el"
    return out


def _run_id(results: Path) -> str:
    return json.loads((results / "manifest.json").read_text())["mlflow_run_id"]


def _run_option(env, out: Path, method: str, examples: int, *option: str) -> tuple[dict, dict]:
    """`evaluation run` of the linked model on rag_dev with ``option`` (4 new tokens, logged to the
    store): its metrics.json and its MLflow run's params."""
    assert main(["run", "--model", str(env["linked"]), "--data", str(env["world"] / "rag_dev"), "--method", method,
                 "--max-examples", str(examples), "--max-new-tokens", "4", *option, "--out", str(out),
                 "--tracking-uri", env["uri"], "--quiet"]) == 0
    return json.loads((out / "metrics.json").read_text()), env["client"].get_run(_run_id(out)).data.params


def _assert_invalid_choice(env, capsys, flag: str, value: str) -> None:
    """`evaluation run FLAG VALUE` stops at the command line: exit 2, argparse's 'invalid choice'."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["run", "--model", str(env["linked"]), "--data", str(env["world"] / "rag_dev"), flag, value])
    assert e.value.code == 2 and f"invalid choice: '{value}'" in capsys.readouterr().err


def test_help_explains_commands_and_methods():
    p = subprocess.run([sys.executable, "-m", "evaluation", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    for word in ("index", "run", "compare", *METHODS, "Recall@1", "MLflow", "onegen.train_run_id"):
        assert word in p.stdout, word
    p = subprocess.run([sys.executable, "-m", "evaluation", "run", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0 and "--tracking-uri" in p.stdout and "--setting" in p.stdout and "--max-examples" in p.stdout


def test_method_registry_is_the_one_list():
    """``onegen.methods`` names the methods once: each builds a retriever evaluation has, and the CLI,
    ``compare``'s order and the quickstart's rows are read from it."""
    import typing

    from evaluation import compare
    from evaluation.config import MethodName
    from evaluation.retrievers import RETRIEVERS
    from onegen.methods import METHODS as REGISTRY
    from onegen.quickstart import GIT_GENERATOR, SAME_GENERATOR

    assert list(REGISTRY) == METHODS == list(typing.get_args(MethodName)) == compare.METHOD_ORDER
    assert {m.retriever for m in REGISTRY.values()} == set(RETRIEVERS)
    assert [n for n, m in REGISTRY.items() if m.own_index] == ["onegen", "two-pass"]
    assert [label for label, _, _ in SAME_GENERATOR] == METHODS
    assert [ckpt for _, ckpt, _ in GIT_GENERATOR] == ["onegen", "onegen", "git", "git", "git"]


def test_index_is_reused_when_complete(env, runs, capsys):
    idx = env["base"] / "index"
    man = json.loads((idx / "manifest.json").read_text())
    stamp = (idx / "embeddings.npy").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["index", "--model", str(env["linked"]), "--data", str(env["world"] / "rag_dev"), "--out", str(idx),
                 "--quiet"]) == 0
    assert "reused" in capsys.readouterr().out
    assert (idx / "embeddings.npy").stat().st_mtime_ns == stamp
    assert json.loads((idx / "manifest.json").read_text()) == man
    # Methods that need an index and got none build it into RESULTS_DIR/index.
    assert (runs["two-pass"] / "index" / "manifest.json").is_file()
    assert not (runs["pipeline-bm25"] / "index").exists() and not (runs["onegen"] / "index").exists()


@pytest.mark.parametrize("method", METHODS)
def test_run_writes_predictions_metrics_plots(runs, method):
    out = runs[method]
    lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 3
    for d in lines:
        assert PRED_KEYS <= set(d), PRED_KEYS - set(d)
        assert d["gold_hops"] and d["gold_answers"] and {"em", "f1"} <= set(d["scores"])
        assert len(d["hops"]) == 2  # forced: one [RQ] every 3 tokens, at most 2
        for h in d["hops"]:
            if method == "no-retrieval":
                assert h["retrieved"] == [] and h["inserted"] is None
            else:
                assert len(h["retrieved"]) == 5 and all(isinstance(i, str) and isinstance(s, float) for i, s in h["retrieved"])
                assert h["inserted"] == h["retrieved"][0][0]
    m = json.loads((out / "metrics.json").read_text())
    head = m["headline"]
    assert HEAD_KEYS <= set(head) and m["task"] == "rag" and m["method"] == method
    assert head["n"] == 3 and head["tokens_per_s"] > 0 and head["s_per_question"] > 0
    assert 0 <= head["em"] <= 1 and 0 <= head["f1"] <= 1
    if method == "no-retrieval":
        assert head["recall_at_1_tf"] is None and head["recall_at_1_free"] is None and m["teacher_forced"] is None
    else:
        assert 0 <= head["recall_at_1_free"] <= 1 and 0 <= head["recall_at_1_tf"] <= 1
        assert {"recall_at_1_free_hop1", "recall_at_1_free_hop2", "recall_at_1_tf_hop1", "recall_at_1_tf_hop2"} <= set(head)
        assert m["teacher_forced"]["n"] == 6  # 3 rows x 2 gold hops
        assert (out / "plots" / "recall_per_hop.png").read_bytes()[:4] == b"\x89PNG"
        assert (out / "plots" / "top1_scores.png").is_file()
    if method in ("onegen", "two-pass"):
        # Same model, same gold rows: the teacher-forced number of the second pass equals the one pass.
        assert head["recall_at_1_tf"] == json.loads((runs["onegen"] / "metrics.json").read_text())["headline"]["recall_at_1_tf"]


@pytest.mark.parametrize("method", METHODS)
def test_run_is_a_top_level_mlflow_run_linked_to_training(env, runs, method):
    client = env["client"]
    run = client.get_run(_run_id(runs[method]))
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    assert run.info.status == "FINISHED"
    assert tags["onegen.stage"] == "eval" and tags["onegen.method"] == method and tags["onegen.dataset"] == "rag_dev"
    assert tags["onegen.model"] == "linked/model" and tags["onegen.mode"] == "onegen"
    # Linked by tag, not nested: the runs table folds child runs under their parent (they were hidden there).
    assert tags["onegen.train_run_id"] == env["train_run"] and "mlflow.parentRunId" not in tags
    assert params["method"] == method and params["setting"] == "distractor" and params["checkpoint_mode"] == "onegen"
    assert len(params["model_fingerprint"]) == 64 and len(params["data_fingerprint"]) == 64
    assert params["gen.batch_size"] == "2"  # the questions were decoded two at a time
    assert {"em", "f1", "tokens_per_s", "s_per_question"} <= set(metrics)
    assert ("recall_at_1_tf" in metrics) == (method != "no-retrieval")
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"predictions.jsonl", "metrics.json", "manifest.json"} <= arts
    if method != "no-retrieval":
        assert {a.path for a in client.list_artifacts(run.info.run_id, "plots")} >= {"plots/recall_per_hop.png"}


def test_entity_linking_run(env, runs, capsys):
    out = runs["el"]
    m = json.loads((out / "metrics.json").read_text())
    head = m["headline"]
    assert m["task"] == "el" and m["setting"] == "open"
    for k in ("el_precision", "el_recall", "el_f1", "el_md_f1", "recall_at_1_tf", "tokens_per_s", "s_per_question"):
        assert head[k] is not None and head[k] >= 0, k
    lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all({"question", "generated_text", "predictions", "gold", "links"} <= set(d) for d in lines)
    assert (out / "index" / "manifest.json").is_file()  # the [SE] entity index, built on the fly
    run = env["client"].get_run(_run_id(out))
    # The checkpoint's training run is not in this store: linked by tag all the same.
    assert run.data.tags["onegen.train_run_id"] == "0" * 32 and "mlflow.parentRunId" not in run.data.tags
    assert run.data.tags["onegen.dataset"] == "el_dev" and "el_f1" in run.data.metrics
    # Given the gold mentions: OneGen's [LK] top-1 vs the name-match baseline, over the same KB (the [SE] index).
    kb = json.loads((out / "index" / "manifest.json").read_text())["count"]
    assert head["kb_size"] == kb == 176 and 0 <= head["el_link_acc_gold"] <= 1 and 0 <= head["el_name_match_acc_gold"] <= 1
    gold = m["gold_mentions"]
    assert gold["onegen"]["n"] == gold["name_match"]["n"] == m["teacher_forced"]["n"] > 0
    assert head["el_name_match_ambiguous"] == gold["name_match"]["ambiguous"] >= 0
    for k in ("el_link_acc_gold", "el_name_match_acc_gold", "el_name_match_ambiguous", "kb_size"):
        assert run.data.metrics[k] == pytest.approx(head[k]), k
    assert run.data.params["link.batch_size"] == "2"  # both texts decoded together
    # Only the model's own [LK] retrieval makes sense for EL.
    capsys.readouterr()
    rc = main(["run", "--model", str(env["elsewhere"]), "--data", str(env["world"] / "el_dev"), "--method", "two-pass",
               "--no-mlflow", "--out", str(env["base"] / "el_bad")])
    assert rc == 2 and "--method onegen only" in capsys.readouterr().err


def test_compare_table_png_csv_markdown(env, runs, capsys):
    png = env["base"] / "cmp" / "compare.png"
    capsys.readouterr()
    assert main(["compare", "--experiment", "onegen", "--tracking-uri", env["uri"], "--out", str(png)]) == 0
    text = capsys.readouterr().out
    for m in METHODS:
        assert m in text
    assert "el_dev" in text and "rag_dev" in text and "R@1 TF" in text
    assert png.read_bytes()[:4] == b"\x89PNG"
    csv_lines = png.with_suffix(".csv").read_text().splitlines()
    assert csv_lines[0].startswith("method,mode,model,dataset") and len(csv_lines) == 1 + 6  # 5 RAG + 1 EL, not training
    md = png.with_suffix(".md").read_text()
    assert md.startswith("| method | mode |") and md.count("\n") == 2 + 6


def test_refuses_a_generation_batch_below_one(env, capsys):
    rc = main(["run", "--model", str(env["linked"]), "--data", str(env["world"] / "rag_dev"), "--gen-batch-size", "0",
               "--no-mlflow", "--out", str(env["base"] / "refused_batch")])
    assert rc == 2 and "--gen-batch-size must be >= 1, got 0" in capsys.readouterr().err


def test_refuses_index_of_another_checkpoint(env, other_model, capsys):  # noqa: F811
    idx = env["base"] / "other_index"
    assert main(["index", "--model", str(other_model), "--data", str(env["world"] / "rag_dev"), "--out", str(idx),
                 "--quiet"]) == 0
    capsys.readouterr()
    rc = main(["run", "--model", str(env["linked"]), "--data", str(env["world"] / "rag_dev"), "--index", str(idx),
               "--max-examples", "1", "--no-mlflow", "--out", str(env["base"] / "refused")])
    err = capsys.readouterr().err
    assert rc == 2 and "was built by checkpoint" in err and "rebuild the index" in err
    assert not (env["base"] / "refused" / "predictions.jsonl").exists()
    # `index` on that dir with this checkpoint rebuilds instead of reusing.
    assert main(["index", "--model", str(env["linked"]), "--data", str(env["world"] / "rag_dev"), "--out", str(idx),
                 "--quiet"]) == 0
    assert "rebuilding" in capsys.readouterr().out


@pytest.mark.slow
def test_trained_checkpoint_links_to_its_real_training_run(trained_model, world, tmp_path):  # noqa: F811
    from mlflow.tracking import MlflowClient

    cfg = json.loads((trained_model / "onegen_config.json").read_text())
    assert cfg["mlflow_run_id"]
    assert main(["run", "--model", str(trained_model), "--data", str(world / "rag_dev"), "--max-examples", "2",
                 "--max-new-tokens", "12", "--tracking-uri", "train", "--out", str(tmp_path / "r"), "--quiet"]) == 0
    store = f"sqlite:///{(trained_model.parent / 'mlflow.db').resolve()}"
    run = MlflowClient(tracking_uri=store).get_run(_run_id(tmp_path / "r"))
    assert cfg["mlflow_run_id"] == run.data.tags["onegen.train_run_id"] and "mlflow.parentRunId" not in run.data.tags
    assert run.data.tags["onegen.mode"] == cfg["mode"]


def test_a_run_ends_with_its_headline_line(env, capsys):
    """The quickstart shows `[eval]` lines of each evaluation: the metrics, as each method finishes."""
    assert main(["run", "--model", str(env["linked"]), "--data", str(env["world"] / "rag_dev"), "--method", "onegen",
                 "--max-examples", "2", "--max-new-tokens", "6", "--force-retrieval-every", "3", "--max-hops", "1",
                 "--no-mlflow", "--quiet", "--out", str(env["base"] / "headline")]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    head = json.loads((env["base"] / "headline" / "metrics.json").read_text())["headline"]
    assert last == (f"[eval] onegen: EM {head['em']:.2f} F1 {head['f1']:.2f} R@1 free {head['recall_at_1_free']:.2f} "
                    f"tf {head['recall_at_1_tf']:.2f} · {head['s_per_question']:.3f} s/question (n=2)")


def test_headline_line_of_entity_linking_and_no_retrieval():
    from evaluation.cli import headline_line

    el = {"el_f1": 0.5, "el_precision": 0.25, "el_recall": 1.0, "el_md_f1": 0.75, "recall_at_1_tf": 1.0,
          "s_per_question": 0.5, "n": 4}
    assert headline_line("onegen", el) == "[eval] onegen: EL F1 0.50 P 0.25 R 1.00 MD F1 0.75 R@1 tf 1.00 · 0.500 s/text (n=4)"
    rag = {"em": 0.1, "f1": 0.15, "recall_at_1_free": None, "recall_at_1_tf": None, "s_per_question": 4.7, "n": 30}
    assert headline_line("no-retrieval", rag) == "[eval] no-retrieval: EM 0.10 F1 0.15 · 4.700 s/question (n=30)"


def test_eval_experiment_opens_on_its_runs_table(env, runs):
    """The store's experiment (created without a kind by the fixture) is marked a machine-learning one."""
    exp = env["client"].get_experiment_by_name("onegen")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    top = env["client"].search_runs([exp.experiment_id], filter_string="tags.`onegen.stage` = 'eval'")
    assert len(top) >= 6 and all("mlflow.parentRunId" not in r.data.tags for r in top)


def test_normalization_flag_reaches_scores_metrics_and_mlflow(env, runs, capsys):
    from evaluation import metrics
    from evaluation.config import NORMALIZATIONS

    assert set(NORMALIZATIONS) == {"default", "official"} and metrics.NORMALIZATIONS is NORMALIZATIONS
    out = env["base"] / "official"
    m, params = _run_option(env, out, "no-retrieval", 2, "--normalization", "official")
    assert m["normalization"] == "official" and m["summary"]["normalization"] == "official"
    assert json.loads((out / "manifest.json").read_text())["normalization"] == "official"
    assert params["normalization"] == "official"
    assert json.loads((runs["onegen"] / "metrics.json").read_text())["normalization"] == "default"
    assert env["client"].get_run(_run_id(runs["onegen"])).data.params["normalization"] == "default"
    _assert_invalid_choice(env, capsys, "--normalization", "squad")
    from evaluation.run import RunConfig, run_eval
    from onegen.errors import ConfigError

    with pytest.raises(ConfigError, match=r"--normalization 'squad': choose one of \['default', 'official'\]"):
        run_eval(RunConfig(model=env["linked"], data=env["world"] / "rag_dev", normalization="squad", tracking=False,
                           out=env["base"] / "bad_norm"))
    help_text = subprocess.run([sys.executable, "-m", "evaluation", "run", "--help"], cwd=ROOT, capture_output=True,
                               text=True, timeout=60).stdout
    assert "--normalization {default,official}" in help_text and "string.punctuation only, no NFC" in " ".join(help_text.split())


def test_scores_follow_the_normalization():
    from types import SimpleNamespace

    from evaluation.scoring import summarize_rag

    r = SimpleNamespace(example_id="q", round=0, stop_reason="eos", answer="O’Brien — Jr", gold_answers=["O'Brien Jr"],
                        gold_hops=[], hops=[], wall_s=0.1, n_generated=3, decode_steps=2, prefills=1,
                        retriever_forwards=0, answer_found=True)
    assert summarize_rag([r], k=1)["em"] == 1.0
    official = summarize_rag([r], k=1, normalization="official")
    # tokens "o’brien", "—", "jr" vs "obrien", "jr": P 1/3, R 1/2, F1 0.4
    assert official["em"] == 0.0 and official["f1"] == pytest.approx(0.4) and official["normalization"] == "official"


def test_a_run_indexes_only_its_rows_documents(env, runs, capsys):
    """--max-examples N in the distractor setting: the index holds the N rows' candidates + gold, and says so."""
    from pipeline.data import open_prepared

    data = open_prepared(env["world"] / "rag_dev")
    want = set().union(*(set(r["candidates"]) | set(r["positives"]) for r in data.query_rows([0, 1, 2])))
    man = json.loads((runs["two-pass"] / "index" / "manifest.json").read_text())
    assert man["subset"] == {"rows": 3, "docs": len(want), "of_docs": len(data.docs)} and man["count"] < len(data.docs)
    m = json.loads((runs["two-pass"] / "metrics.json").read_text())
    assert m["index_subset"] == man["subset"]
    assert env["client"].get_run(_run_id(runs["two-pass"])).data.params["index_subset_rows"] == "3"
    # The full index given with --index (the quickstart's way) stays full.
    assert json.loads((runs["onegen"] / "metrics.json").read_text())["index_subset"] is None
    # `index --rows N`; a subset given to a run that needs more documents is refused, one that covers it is used.
    sub = env["base"] / "index_rows2"
    assert main(["index", "--model", str(env["linked"]), "--data", str(env["world"] / "rag_dev"), "--out", str(sub),
                 "--rows", "2", "--quiet"]) == 0
    assert "(the first 2 rows' own, of 40)" in capsys.readouterr().out
    base = ["run", "--model", str(env["linked"]), "--data", str(env["world"] / "rag_dev"), "--index", str(sub),
            "--max-new-tokens", "3", "--no-mlflow", "--quiet"]
    for extra in (["--max-examples", "3"], ["--max-examples", "2", "--setting", "open"]):
        assert main(base + extra + ["--out", str(env["base"] / "sub_refused")]) == 2, extra
        err = capsys.readouterr().err
        assert "is a subset index" in err and "omit --index" in err, err
    assert main(base + ["--max-examples", "2", "--out", str(env["base"] / "sub_ok")]) == 0


def test_pipeline_query_forms():
    from evaluation.retrievers import PIPELINE_QUERIES, RetrievalStep
    from onegen.errors import ConfigError

    st = RetrievalStep(question="Where was the director of Film A born?", generated_text=" Search: Film A director Search: "
                       "Bob Ray place of birth", k=1, latest_text=" Search: Bob Ray place of birth")
    # full: unchanged from before the option (the question, a space, the generation as decoded)
    assert st.pipeline_query() == st.pipeline_query("full") == f"{st.question} {st.generated_text}"
    assert st.pipeline_query("latest") == "Where was the director of Film A born? Search: Bob Ray place of birth"
    assert st.pipeline_query("lead") == "Search: Bob Ray place of birth"
    assert RetrievalStep(question="Q?", generated_text="", k=1, latest_text=" ").pipeline_query("lead") == "Q?"
    assert RetrievalStep(question="Q?", generated_text="x", k=1).pipeline_query("latest") == "Q? x"  # no latest: all
    assert PIPELINE_QUERIES == ("full", "latest", "lead")
    with pytest.raises(ConfigError, match="choose one of"):
        st.pipeline_query("hyde")


def test_pipeline_query_flag_reaches_the_retriever_metrics_and_mlflow(env, capsys):
    m, params = _run_option(env, env["base"] / "lead-query", "pipeline-bm25", 3, "--pipeline-query", "lead")
    assert m["pipeline_query"] == "lead" and m["teacher_forced"]["query"] == "lead"
    assert params["pipeline_query"] == "lead"
    _assert_invalid_choice(env, capsys, "--pipeline-query", "hyde")
