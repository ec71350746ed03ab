from dataclasses import dataclass, field

import pytest

from onegen.config import load_config
from onegen.errors import ConfigError


@dataclass
class Inner:
    lr: float = 1e-3
    steps: int = 10


@dataclass
class Outer:
    train: Inner = field(default_factory=Inner)
    name: str = "x"


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("name: a\ntrain:\n  steps: 5\n")
    cfg = load_config(Outer, p, ["train.lr=3e-4"])
    assert cfg.name == "a" and cfg.train.steps == 5 and cfg.train.lr == pytest.approx(3e-4)


def test_unknown_field_in_recipe_names_file_and_suggestion(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("train:\n  step: 5\n")
    with pytest.raises(ConfigError) as e:
        load_config(Outer, p)
    assert "r.yaml" in str(e.value) and "'step'" in str(e.value) and "did you mean 'steps'" in str(e.value)


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match="train.steps: expected an integer"):
        load_config(Outer, None, ["train.steps=abc"])


def test_trainer_value_checks_blame_the_recipe_line_or_the_override(tmp_path):
    from pipeline.config import TrainConfig

    p = tmp_path / "r.yaml"
    p.write_text("seed: 0\nkeep_checkpoints: 0\n")
    with pytest.raises(ConfigError, match=r"r\.yaml:2, field 'keep_checkpoints': expected >= 1, got 0"):
        load_config(TrainConfig, p)
    with pytest.raises(ConfigError, match=r"override 'checkpoint_every=-5': expected >= 0 \(0 turns it off\)"):
        load_config(TrainConfig, None, ["checkpoint_every=-5"])
    # 0 is valid: no periodic checkpoints (the run still saves at the end); it used to divide by zero
    assert load_config(TrainConfig, None, ["checkpoint_every=0", "eval_every=0"]).checkpoint_every == 0


def test_resume_refuses_other_mixing_weights(tmp_path):
    """The data position a checkpoint keeps (units consumed) indexes the weighted plan: other weights are
    another order, so a resume with them is refused; a run from before the weights existed resumes."""
    import yaml

    from onegen.config import dump_yaml, load_config
    from onegen.errors import OneGenError
    from pipeline.config import TrainConfig
    from pipeline.train import _check_resume_config

    def cfg(*overrides: str) -> TrainConfig:
        return load_config(TrainConfig, None, [f"output_dir={tmp_path}", "data.train=[a,b]", *overrides])

    (tmp_path / "config.yaml").write_text(dump_yaml(cfg("data.train_weights=[1,2]")))
    _check_resume_config(tmp_path, cfg("data.train_weights=[1,2]"))
    with pytest.raises(OneGenError, match="changed: data.train_weights"):
        _check_resume_config(tmp_path, cfg("data.train_weights=[1,3]"))
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    del saved["data"]["train_weights"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    _check_resume_config(tmp_path, cfg())
