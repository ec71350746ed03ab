"""A newcomer's first mistakes get the right answer (issue #14, CLI side).

* No argparse prefix matching anywhere: ``--step 10`` is not ``--steps 10``.
* A wrong ``--model``/``--data`` path says what it is and which path to give (a directory that does
  not exist, a training run instead of its ``model/``, a raw ``.json`` benchmark file, a directory of
  outputs), not "an interrupted run leaves none".
* Every entry point sets the offline environment itself (without ``scripts/env.sh``).
* ``prepare`` without ``--tokenizer`` says that it trained a BPE tokenizer, on the console and in
  the manifest.
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from onegen.environment import OFFLINE_VARS, apply_offline_defaults, offline_defaults
from onegen.errors import ManifestMismatch
from pipeline.data import open_prepared, read_output_manifest
from tests.train_fixtures import ROOT

SOURCE_DIRS = ("onegen", "data_prep", "pipeline", "evaluation", "bench", "scripts", "slurm", "tests")


# ---- allow_abbrev=False ---------------------------------------------------------------------------

def _parsers_without_allow_abbrev(path: Path, root: Path = ROOT) -> list[str]:
    bad = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Call):
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        if name not in ("ArgumentParser", "add_parser"):
            continue
        kw = {k.arg: k.value for k in node.keywords}
        if not (isinstance(kw.get("allow_abbrev"), ast.Constant) and kw["allow_abbrev"].value is False):
            bad.append(f"{path.relative_to(root)}:{node.lineno} {name}(...)")
    return bad


def test_the_check_finds_a_parser_without_allow_abbrev(tmp_path):
    p = tmp_path / "x.py"
    p.write_text("import argparse\np = argparse.ArgumentParser(prog='x')\ns = p.add_subparsers()\n"
                 "s.add_parser('a', allow_abbrev=False)\ns.add_parser('b')\n")
    assert _parsers_without_allow_abbrev(p, tmp_path) == ["x.py:2 ArgumentParser(...)", "x.py:5 add_parser(...)"]


def test_every_argument_parser_in_the_repo_refuses_prefixes():
    files = [p for d in SOURCE_DIRS for p in sorted((ROOT / d).rglob("*.py"))]
    assert len(files) > 50
    bad = [b for f in files for b in _parsers_without_allow_abbrev(f)]
    assert not bad, "parsers without allow_abbrev=False (a prefix like --step would mean --steps):\n" + "\n".join(bad)


@pytest.mark.parametrize("module, argv", [
    ("onegen.quickstart", ["--step", "10", "--out", "/nonexistent/qs"]),
    ("data_prep.__main__", ["world", "--out", "/nonexistent/w", "--train-q", "5"]),
    ("evaluation.cli", ["run", "--model", "m", "--data", "d", "--max-ex", "3"]),
    ("pipeline.train", ["--conf", "configs/tiny-cpu.yaml"]),
])
def test_a_prefix_of_an_option_is_an_error(module, argv, capsys):
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


# ---- wrong paths: what they are and what to give ------------------------------------------------

def _manifest(d: Path, stage: str) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "manifest.json").write_text(json.dumps({"stage": stage, "fingerprint": "f" * 64}))
    return d


@pytest.fixture
def tree(tmp_path):
    """A quickstart-like output: world/ with prepared splits, train-*/ runs with their model/."""
    out = tmp_path / "qs"
    for split in ("rag_train", "rag_dev"):
        _manifest(out / "world" / split, "data_prep")
    for mode in ("onegen", "git"):
        _manifest(out / f"train-{mode}" / "model", "train")
        (out / f"train-{mode}" / "model" / "onegen_config.json").write_text("{}")
        (out / f"train-{mode}" / "checkpoints").mkdir()
    raw = tmp_path / "hotpot_dev.json"
    raw.write_text("[]")
    return out, raw


def _why(path, stage) -> str:
    with pytest.raises(ManifestMismatch) as e:
        read_output_manifest(path, stage)
    return str(e.value)


def test_a_training_run_given_for_its_model(tree):
    out, _ = tree
    run = out / "train-onegen"
    assert _why(run, "train") == f"{run} is a training run; its model is {run / 'model'}"


def test_a_raw_benchmark_file_given_for_a_prepared_dataset(tree):
    _, raw = tree
    msg = _why(raw, "data_prep")
    assert msg.startswith(f"{raw} is a raw benchmark file, not a prepared dataset")
    assert f"python -m data_prep prepare --kind hotpotqa --input {raw} --out DIR" in msg
    assert "interrupted" not in msg


def test_a_path_that_does_not_exist_names_the_outputs_nearby(tree, tmp_path):
    out, _ = tree
    msg = _why(out / "world" / "rag_dve", "data_prep")
    assert msg.startswith(f"{out / 'world' / 'rag_dve'} does not exist; prepared datasets under {out / 'world'}: ")
    assert str(out / "world" / "rag_dev") in msg and "interrupted" not in msg
    msg = _why(tmp_path / "nowhere" / "at" / "all", "train")
    assert msg.startswith(f"{tmp_path / 'nowhere' / 'at' / 'all'} does not exist ({tmp_path} is the nearest")
    assert "pipeline/train.py" in msg


def test_a_directory_of_outputs_names_them(tree):
    out, _ = tree
    msg = _why(out / "world", "data_prep")
    assert msg == (f"{out / 'world'} is not a prepared dataset itself; it holds prepared datasets: "
                   f"{out / 'world' / 'rag_dev'}, {out / 'world' / 'rag_train'}")
    msg = _why(out, "train")
    assert msg == (f"{out} is not a model export itself; it holds model exports: "
                   f"{out / 'train-git' / 'model'}, {out / 'train-onegen' / 'model'}")


def test_another_stage_output_and_an_empty_dir(tree, tmp_path):
    out, _ = tree
    model = out / "train-onegen" / "model"
    assert _why(model, "data_prep").startswith(f"{model} is a model export, not a prepared dataset; prepare one")
    (tmp_path / "empty").mkdir()
    assert "holds nothing onegen wrote" in _why(tmp_path / "empty", "train")


def test_an_interrupted_run_keeps_its_message(tree, tmp_path):
    """Shards without a manifest (a killed prep), checkpoints without an export: that message is right there."""
    prep = tmp_path / "killed_prep"
    (prep / "queries").mkdir(parents=True)
    for d, stage in ((prep, "data_prep"), (tmp_path / "run_without_export", "train")):
        if stage == "train":
            (d / "checkpoints").mkdir(parents=True)
        assert "an interrupted run leaves none" in _why(d, stage)


def test_the_trainer_and_the_evaluation_cli_give_these_messages(tree, capsys):
    from evaluation.cli import main

    out, raw = tree
    with pytest.raises(ManifestMismatch, match="is a raw benchmark file"):
        open_prepared(raw)  # what the trainer opens data.train/data.eval with
    run = out / "train-onegen"
    rc = main(["run", "--model", str(run), "--data", str(out / "world" / "rag_dev"), "--no-mlflow", "--quiet"])
    assert rc == 2 and f"error: {run} is a training run; its model is {run / 'model'}" in capsys.readouterr().err
    rc = main(["index", "--model", str(run / "model"), "--data", str(raw), "--out", str(out / "idx"), "--quiet"])
    assert rc == 2 and f"error: {raw} is a raw benchmark file" in capsys.readouterr().err


# ---- the offline environment ---------------------------------------------------------------------

def test_offline_defaults_fill_only_what_is_unset():
    env = {"HF_HOME": "/mine", "TOKENIZERS_PARALLELISM": "true"}
    added = apply_offline_defaults(env)
    assert env["HF_HOME"] == "/mine" and env["TOKENIZERS_PARALLELISM"] == "true"
    assert "HF_HOME" not in added and env["TORCH_EXTENSIONS_DIR"] == str(ROOT / ".cache" / "torch_extensions")
    assert all(env[k] == "1" for k in OFFLINE_VARS) and env["MLFLOW_DISABLE_TELEMETRY"] == "true"
    net = {}
    apply_offline_defaults(net, network=True)
    assert not set(OFFLINE_VARS) & set(net)


def test_env_sh_and_the_python_defaults_agree():
    """scripts/env.sh (the shell entry scripts) and onegen.environment (every Python entry point) set the same."""
    env = {k: v for k, v in os.environ.items() if k not in offline_defaults()}
    p = subprocess.run(["bash", "-c", f"source {ROOT / 'scripts' / 'env.sh'} && env"], env=env, capture_output=True,
                       text=True, timeout=60)
    shell = dict(line.split("=", 1) for line in p.stdout.splitlines() if "=" in line)
    for k, v in offline_defaults().items():
        assert shell.get(k) == v, k


_PROBE = """
import os, runpy, sys
target, argv = sys.argv[1], sys.argv[2:]
sys.argv = [target, *argv]
try:
    if target.endswith(".py"):
        runpy.run_path(target, run_name="__main__")
    else:
        runpy.run_module(target, run_name="__main__", alter_sys=True)
except SystemExit:
    pass
print("ENV", os.environ.get("TORCH_EXTENSIONS_DIR"), os.environ.get("HF_HUB_OFFLINE"), os.environ.get("HF_HOME"))
"""


@pytest.mark.parametrize("target", ["data_prep", "evaluation", "onegen.quickstart", "pipeline/train.py"])
def test_every_entry_point_sets_the_offline_environment_itself(target):
    """Run without scripts/env.sh: the entry point sets the variables before it imports DeepSpeed/transformers."""
    env = {k: v for k, v in os.environ.items() if k not in offline_defaults() and not k.startswith("MLFLOW")}
    env["PYTHONPATH"] = str(ROOT)
    p = subprocess.run([sys.executable, "-c", _PROBE, target, "--help"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    line = next((x for x in p.stdout.splitlines() if x.startswith("ENV ")), p.stdout[-500:] + p.stderr[-2000:])
    assert line == f"ENV {ROOT / '.cache' / 'torch_extensions'} 1 {ROOT / '.cache' / 'huggingface'}", line


def test_quickstart_stages_get_the_same_environment(monkeypatch):
    from onegen import stages

    for k in offline_defaults():
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("RANK", "3")
    env = stages.stage_env()
    assert {k: env[k] for k in offline_defaults()} == offline_defaults() and "RANK" not in env


# ---- prepare without --tokenizer says what it did -------------------------------------------------

def _hotpot(i: int) -> dict:
    a, b = f"Founder{i}", f"Company{i}"
    return {"_id": f"q{i}", "question": f"Where was the founder of {b} born?", "answer": "Paris", "type": "bridge",
            "supporting_facts": [[b, 0], [a, 1]],
            "context": [[b, [f"{b} is a firm.", f" It was founded by {a}."]],
                        [a, [f"{a} is an engineer.", f" {a} was born in Paris."]],
                        [f"Other{i}", [f"Other{i} is a town near Lyon."]]]}


def test_prepare_without_tokenizer_says_it_trained_one(tmp_path):
    raw = tmp_path / "hotpot.json"
    raw.write_text(json.dumps([_hotpot(i) for i in range(6)]))
    out = tmp_path / "prepared"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-m", "data_prep", "prepare", "--kind", "hotpotqa", "--input", str(raw),
                        "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    line = next(x for x in p.stdout.splitlines() if x.startswith("[prep] tokenizer:"))
    n = int(re.search(r"trained a byte-level BPE of (\d+) tokens on this data", line).group(1))
    assert 0 < n <= 2000 and "(tokenizer=bpe:2000, the default without --tokenizer)" in line and "--tokenizer <model dir>" in line
    assert json.loads((out / "manifest.json").read_text())["tokenizer_source"] == "trained bpe:2000 on this data"
