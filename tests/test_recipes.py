"""Every recipe and DeepSpeed config parses, and typos are rejected (DeepSpeed itself ignores them)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from onegen.config import load_config
from onegen.errors import ConfigError
from pipeline.config import TrainConfig
from pipeline.ds_config import fill_auto, load_ds_config, validate_keys

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "configs").glob("*.yaml"))
DS = sorted((ROOT / "ds_configs").glob("*.json"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_loads(recipe):
    cfg = load_config(TrainConfig, recipe)
    assert cfg.data.train and Path(ROOT / cfg.deepspeed).is_file()


@pytest.mark.parametrize("path", DS, ids=lambda p: p.name)
def test_ds_config_fills_every_auto(path):
    cfg = fill_auto(load_ds_config(path), micro_batch=2, grad_accum=1, world_size=2, lr=1e-3, weight_decay=0.0,
                    warmup_steps=5, total_steps=10, grad_clip=1.0, bf16=False, hidden_size=64)
    assert "auto" not in json.dumps(cfg)
    validate_keys(cfg, path.name)


@pytest.mark.parametrize("where,key", [((), "gradient_clippping"), (("zero_optimization",), "stage3_prefech_bucket_size"),
                                        (("optimizer", "params"), "weight_decy"), (("bf16",), "enable")])
def test_misspelled_deepspeed_key_is_rejected(tmp_path, where, key):
    cfg = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())
    node = cfg
    for part in where:
        node = node[part]
    node[key] = 1
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=key):
        load_ds_config(bad)


def test_recipe_with_unknown_field_is_rejected(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text((ROOT / "configs" / "tiny-cpu.yaml").read_text().replace("max_steps:", "max_step:"))
    with pytest.raises(ConfigError, match="unknown field 'max_step'.*did you mean 'max_steps'"):
        load_config(TrainConfig, bad)
