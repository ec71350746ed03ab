"""Every recipe and DeepSpeed config parses, and typos are rejected (DeepSpeed itself ignores them)."""

from __future__ import annotations

import json
import re
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


# ---- the GPU recipes follow the reference setting (zjunlp/OneGen workflow/*.json; issue #13) ----------------

GPUS = 8  # the GPU recipes are written for one node of 8 GPUs
CPU_RECIPES = {"tiny-cpu.yaml", "smollm2-cpu.yaml"}
MULTIHOP = dict(lr=2e-5, epochs=3, global_batch=64)
EL = dict(lr=5e-6, epochs=6, global_batch=80, negatives=4)
# recipe -> (model.source, settings); negatives per positive as in the reference's n_neg_per_pos
REFERENCE = {
    "qwen2-1.5b-multihop.yaml": ("Qwen/Qwen2-1.5B-Instruct", {**MULTIHOP, "negatives": 6}),
    "qwen2-7b-multihop.yaml": ("Qwen/Qwen2-7B-Instruct", {**MULTIHOP, "negatives": 2}),
    "llama2-7b-multihop.yaml": ("meta-llama/Llama-2-7b-chat-hf", {**MULTIHOP, "negatives": 6}),
    "llama3.1-8b-multihop.yaml": ("meta-llama/Llama-3.1-8B-Instruct", {**MULTIHOP, "negatives": 2}),
    "llama2-7b-el.yaml": ("meta-llama/Llama-2-7b-chat-hf", EL),
    "llama3.1-8b-el.yaml": ("meta-llama/Llama-3.1-8B-Instruct", EL),
    "qwen2-1.5b-el.yaml": ("Qwen/Qwen2-1.5B-Instruct", EL),
}
GPU_RECIPES = sorted(REFERENCE)
# LoRA variants for one 48 GB GPU (issue #15) -> the full fine-tuning recipe whose data, loss and global batch they keep
LORA_RECIPES = {"qwen2-1.5b-lora.yaml": "qwen2-1.5b-multihop.yaml", "llama2-7b-lora.yaml": "llama2-7b-multihop.yaml"}


def test_every_gpu_recipe_is_in_the_reference_table():
    """A new GPU recipe must say which reference setting it follows (and the Qwen2-7B multi-hop one exists)."""
    on_disk = {p.name for p in RECIPES} - CPU_RECIPES - set(LORA_RECIPES)
    assert on_disk == set(REFERENCE), f"recipes without a reference row: {on_disk ^ set(REFERENCE)}"
    assert (ROOT / "configs" / "qwen2-7b-multihop.yaml").is_file()


@pytest.mark.parametrize("name", GPU_RECIPES)
def test_gpu_recipe_follows_the_reference(name):
    source, ref = REFERENCE[name]
    cfg = load_config(TrainConfig, ROOT / "configs" / name)
    assert cfg.model.source == source and ("Instruct" in source or "-chat" in source)
    assert cfg.model.dtype == "bf16" and cfg.model.gradient_checkpointing
    assert (cfg.loss.mode, cfg.loss.ret_loss, cfg.loss.lambda_gen, cfg.loss.lambda_ret) == ("onegen", "bpr", 1.0, 1.0)
    assert cfg.loss.num_negatives == ref["negatives"]
    o = cfg.optim
    assert o.lr == pytest.approx(ref["lr"]) and o.epochs == ref["epochs"]
    assert o.betas == [0.9, 0.999] and o.warmup_steps == 0 and o.weight_decay == 0.0 and o.grad_clip == 1.0
    assert o.micro_batch_size * o.grad_accum * GPUS == ref["global_batch"]
    assert cfg.deepspeed == "ds_configs/zero3.json"
    zero = json.loads((ROOT / cfg.deepspeed).read_text())["zero_optimization"]
    assert zero["stage"] == 3 and not {"offload_optimizer", "offload_param"} & set(zero)


@pytest.mark.parametrize("name", sorted(LORA_RECIPES))
def test_lora_recipe_keeps_its_full_recipe_and_states_its_memory(name):
    lora, full = (load_config(TrainConfig, ROOT / "configs" / n) for n in (name, LORA_RECIPES[name]))
    assert lora.model.lora.enabled and not full.model.lora.enabled and lora.model.train_layers == 0
    assert (lora.model.source, lora.model.dtype, lora.data, lora.loss) == (full.model.source, "bf16", full.data, full.loss)
    assert lora.optim.micro_batch_size * lora.optim.grad_accum == full.optim.micro_batch_size * full.optim.grad_accum * GPUS
    assert lora.optim.epochs == full.optim.epochs
    text = (ROOT / "configs" / name).read_text()
    assert re.search(r"Expected GPU memory, about \d+ GB of 48", text) and "--num_gpus 1" in text


@pytest.mark.parametrize("name", GPU_RECIPES)
def test_gpu_recipe_prep_command_sets_the_reference_max_length(name):
    """The max length is a data-prep option: the recipe's prep commands must carry it (~1,100-1,300 tokens)."""
    text = (ROOT / "configs" / name).read_text()
    comment = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    assert "python -m data_prep prepare --kind" in comment
    lengths = [int(n) for n in re.findall(r"tagging\.max_length=(\d+)", comment)]
    assert lengths and all(1000 <= n <= 1400 for n in lengths), lengths
    assert len(set(lengths)) == 1, f"train and eval data prepared with different max lengths: {lengths}"
    cfg = load_config(TrainConfig, ROOT / "configs" / name)
    for d in [*cfg.data.train, *cfg.data.eval]:
        assert f"--out {d} " in comment, f"{d} has no prep command in the recipe's comment"


def test_prepared_dirs_are_not_shared_across_tokenizers():
    """Prepared data is tokenizer-specific: Llama-2 and Llama-3.1 (and Qwen2) must not read the same dirs."""
    family = {"Qwen/Qwen2-1.5B-Instruct": "qwen2", "Qwen/Qwen2-7B-Instruct": "qwen2",
              "meta-llama/Llama-2-7b-chat-hf": "llama2", "meta-llama/Llama-3.1-8B-Instruct": "llama3"}
    owner: dict[str, str] = {}
    for name in GPU_RECIPES:
        cfg = load_config(TrainConfig, ROOT / "configs" / name)
        for d in [*cfg.data.train, *cfg.data.eval]:
            fam = family[cfg.model.source]
            assert owner.setdefault(d, fam) == fam, f"{d} is read by {owner[d]} and {fam} recipes"


def test_every_recipe_is_in_the_readme_table():
    readme = (ROOT / "configs" / "README.md").read_text()
    rows = [line for line in readme.splitlines() if line.startswith("|")]
    for p in RECIPES:
        row = [r for r in rows if f"`{p.name}`" in r]
        assert row, f"configs/README.md has no table row for {p.name}"
        if p.name not in CPU_RECIPES:  # recipe -> model -> paper row -> data -> batch -> GPU-hours
            source, ref = REFERENCE[LORA_RECIPES.get(p.name, p.name)]
            assert source in row[0] and str(ref["global_batch"]) in row[0]
            assert re.search(r"\d+(\.\d+)? / \d+(\.\d+)?", row[0].split("|")[-2]), f"no GPU-hours in {row[0]}"
