"""Flags made from a config dataclass (onegen.config_flags) and the evaluation stage's typed configs."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from evaluation.cli import _config, _parser, main
from evaluation.config import CompareConfig, IndexConfig, RunConfig
from onegen.config import load_config
from onegen.config_flags import add_config_flags, flag_overrides
from onegen.errors import ConfigError


@dataclass
class Toy:
    path: Path = field(metadata={"help": "where"})
    mode: Literal["a", "b"] = field(default="a", metadata={"help": "which"})
    n: int = field(default=3, metadata={"help": "how many"})
    scale: float | None = field(default=None, metadata={"help": "how much"})
    verbose: bool = field(default=False, metadata={"help": "talk"})
    bars: bool = field(default=True, metadata={"help": "bars", "flags": ("--quiet",), "flag_help": "no bars"})
    logged: bool = field(default=True, metadata={"help": "log it"})
    hidden: int = field(default=0, metadata={"help": "recipe only", "flags": ()})
    extra: dict = field(default_factory=dict)


def _parse(*argv: str) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    p = argparse.ArgumentParser(allow_abbrev=False)
    add_config_flags(p, Toy)
    return p.parse_args(list(argv)), p


def test_flags_follow_the_fields_and_only_given_ones_override():
    ns, p = _parse("--path", "x/y", "--mode", "b", "--n", "7", "--quiet", "--no-logged", "--verbose")
    assert flag_overrides(ns, Toy) == ['path="x/y"', 'mode="b"', "n=7", "verbose=true", "bars=false", "logged=false"]
    cfg = load_config(Toy, None, flag_overrides(ns, Toy))
    assert (cfg.path, cfg.mode, cfg.n, cfg.verbose, cfg.bars, cfg.logged) == (Path("x/y"), "b", 7, True, False, False)
    ns, _ = _parse("--path", "p")
    assert flag_overrides(ns, Toy) == ['path="p"']  # a default is never restated as an override
    options = {o for a in p._actions for o in a.option_strings}
    assert {"--path", "--mode", "--n", "--scale", "--verbose", "--quiet", "--no-logged"} <= options
    assert not {"--hidden", "--extra", "--bars", "--logged"} & options
    help_of = {a.dest: a.help for a in p._actions}
    assert help_of["cfg__n"] == "how many [default: 3]" and help_of["cfg__bars"] == "no bars"
    with pytest.raises(SystemExit):
        _parse("--mode", "c")
    with pytest.raises(SystemExit):
        _parse("--n", "seven")


def test_a_path_string_that_yaml_would_read_as_another_type_stays_a_path():
    ns, _ = _parse("--path", "yes")
    assert load_config(Toy, None, flag_overrides(ns, Toy)).path == Path("yes")


def test_a_missing_required_field_is_named():
    with pytest.raises(ConfigError, match=r"config\.path: required and not set"):
        load_config(Toy, None, [])


def _eval(*argv: str):
    return _config(_parser().parse_args(list(argv)))


def test_eval_recipe_then_flags_then_key_value(tmp_path):
    recipe = tmp_path / "eval.yaml"
    recipe.write_text("model: ckpt/model\ndata: prep/rag_dev\nmethod: pipeline-bm25\nk: 9\nmax_hops: 3\n")
    cfg = _eval("run", "--config", str(recipe), "--k", "2", "max_hops=1", "extra_params={seed: 4}")
    assert isinstance(cfg, RunConfig)
    assert (cfg.model, cfg.method, cfg.k, cfg.max_hops, cfg.extra_params) == (Path("ckpt/model"), "pipeline-bm25", 2, 1,
                                                                              {"seed": 4})
    assert (cfg.tracking, cfg.progress) == (True, True)
    assert _eval("run", "--model", "m", "--data", "d", "--no-mlflow", "--quiet").tracking is False
    assert isinstance(_eval("index", "--model", "m", "--data", "d", "--out", "o"), IndexConfig)
    assert _eval("compare", "--all").all is True and isinstance(_eval("compare"), CompareConfig)


def test_eval_recipe_errors_name_file_line_and_field(tmp_path):
    recipe = tmp_path / "eval.yaml"
    recipe.write_text("model: m\ndata: d\nmethod: bm25\n")
    with pytest.raises(ConfigError, match=r"eval\.yaml:3, field 'method': 'bm25' is not one of \['onegen'"):
        _eval("run", "--config", str(recipe))
    with pytest.raises(ConfigError, match=r"override max_hop: unknown field 'max_hop'.*did you mean 'max_hops'"):
        _eval("run", "--model", "m", "--data", "d", "max_hop=2")


@pytest.mark.parametrize("cmd,cls", [("index", IndexConfig), ("run", RunConfig), ("compare", CompareConfig)])
def test_help_config_lists_every_field(cmd, cls, capsys):
    assert main([cmd, "--help-config"]) == 0
    listed = [line.split("=")[0].strip() for line in capsys.readouterr().out.splitlines()]

    def names(c: type, prefix: str = "") -> list[str]:
        return [n for f in dataclasses.fields(c)
                for n in (names(f.default_factory, f"{prefix}{f.name}.") if dataclasses.is_dataclass(f.default_factory)
                          else [prefix + f.name])]

    assert listed == names(cls)


def test_a_flat_section_gets_flags_of_its_own_names():
    cfg = _eval("run", "--model", "m", "--data", "d", "--nprobe", "16", "--faiss-fp16", "faiss.ef_search=64")
    assert (cfg.faiss.nprobe, cfg.faiss.faiss_fp16, cfg.faiss.ef_search) == (16, True, 64)
    assert _eval("index", "--model", "m", "--data", "d", "--out", "o", "--kind", "ivfpq", "--pq-m", "8").faiss.pq_m == 8


def test_prep_world_has_the_same_mechanism(capsys, tmp_path):
    from data_prep.__main__ import main as prep_main

    assert prep_main(["world", "--help-config"]) == 0
    fields = capsys.readouterr().out
    assert "  num_proc = 1" in fields and "world.n_train_questions" in fields
    assert prep_main(["world", "--num-proc", "2"]) == 2 and "give the output directory" in capsys.readouterr().err
    assert prep_main(["world", "--out", str(tmp_path / "w"), "world.n_train_question=3"]) == 2
    assert "did you mean 'n_train_questions'" in capsys.readouterr().err
