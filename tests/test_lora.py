"""``model.lora`` (pipeline/lora.py): peft adapters on a frozen base, the new tokens' rows trainable, the merged
export and the adapter-only export; the slow tests run the real trainer (ZeRO-3 on 2 ranks, ZeRO-2 on 1 and 2)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import transformers

from onegen.config import FieldError
from onegen.hidden import decoder_of
from pipeline.config import LoraConfig, ModelConfig
from pipeline.lora import (NewTokenEmbedding, NewTokenHead, add_lora, merged_state_dict, parameter_counts,
                           write_adapter)
from tests.train_fixtures import make_world, run, train_cmd

V, H, INTER, LAYERS, NEW = 50, 32, 64, 2, [46, 48, 49]
LORA = LoraConfig(enabled=True, r=4, alpha=8.0, dropout=0.0)


def _base(tied: bool) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=H, intermediate_size=INTER, num_hidden_layers=LAYERS, num_attention_heads=2,
                                   num_key_value_heads=2, vocab_size=V, tie_word_embeddings=tied)
    return transformers.LlamaForCausalLM(cfg).eval()


def _lora(tied: bool):
    base = _base(tied)
    return base, add_lora(copy.deepcopy(base), LORA, NEW, seed=0)


def _ids() -> torch.Tensor:
    torch.manual_seed(1)
    ids = torch.randint(0, 46, (2, 9))
    ids[0, 3], ids[1, 5], ids[1, 7] = 46, 48, 49
    return ids


def _logits(model, ids):
    """As the trainer computes them: the decoder's states, then the LM head (pipeline/forward.py)."""
    h = decoder_of(model)(input_ids=ids).last_hidden_state
    return model.get_output_embeddings()(h)


def _sgd_step(model, ids) -> None:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    logits = _logits(model, ids)
    torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1)).backward()
    opt.step()


@pytest.mark.parametrize("tied", [True, False])
def test_only_adapters_and_new_rows_train_and_the_count_is_as_expected(tied):
    _, model = _lora(tied)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n or n.endswith(".delta") for n in trainable)
    assert isinstance(model.get_input_embeddings(), NewTokenEmbedding)
    assert isinstance(model.get_output_embeddings(), NewTokenHead)
    assert decoder_of(model) is model.get_base_model().model  # found through the peft wrapper
    per_layer = 4 * LORA.r * (H + H) + 2 * LORA.r * (H + INTER) + LORA.r * (INTER + H)  # q k v o, gate up, down
    rows = len(NEW) * H * (1 if tied else 2)
    total = sum(p.numel() for p in _base(tied).parameters())
    assert parameter_counts(model) == (LAYERS * per_layer + rows, total + LAYERS * per_layer + rows)


@pytest.mark.parametrize("tied", [True, False])
def test_the_model_is_unchanged_at_step_zero(tied):
    base, model = _lora(tied)
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(_logits(model, ids), base(input_ids=ids).logits)


@pytest.mark.parametrize("tied", [True, False])
def test_a_step_moves_only_the_new_rows_and_the_merge_matches_the_peft_model(tied):
    base, model = _lora(tied)
    ids = _ids()
    before = {k: v.clone() for k, v in merged_state_dict(model, model.state_dict()).items()}
    _sgd_step(model, ids)
    after = merged_state_dict(model, model.state_dict())
    assert set(after) == set(base.state_dict())
    if tied:  # one matrix, saved once
        assert after["lm_head.weight"] is after["model.embed_tokens.weight"]
    old = [i for i in range(V) if i not in NEW]
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(after[key][old], before[key][old]), key  # old rows bit-unchanged
        assert not torch.equal(after[key][NEW], before[key][NEW]), key
    assert not torch.equal(after["model.layers.0.self_attn.q_proj.weight"], before["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(after["model.norm.weight"], before["model.norm.weight"])

    plain = _base(tied)
    plain.load_state_dict(after, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, _logits(model, ids), atol=1e-5, rtol=0)


def _tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(V)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", pad_token="w1", eos_token="w2")
    fast.save_pretrained(str(path))
    return fast


@pytest.mark.parametrize("tied", [True, False])
def test_the_adapter_export_loads_on_its_base_with_model_io(tied, tmp_path):
    from onegen.model_io import load_model

    base, model = _lora(tied)
    ids = _ids()
    _sgd_step(model, ids)
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    base.save_pretrained(str(base_dir))
    adapter_dir.mkdir()
    write_adapter(model, model.state_dict(), adapter_dir, LORA, str(base_dir))
    _tokenizer(adapter_dir)
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(base_dir) and cfg["r"] == LORA.r
    assert set(cfg["trainable_token_indices"]) == ({"embed_tokens"} if tied else {"embed_tokens", "lm_head"})
    loaded, _ = load_model(adapter_dir)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, _logits(model, ids), atol=1e-5, rtol=0)


def test_lora_with_train_layers_is_refused():
    with pytest.raises(FieldError, match="model.lora.enabled.*model.train_layers"):
        ModelConfig(lora=LoraConfig(enabled=True), train_layers=1)


def test_a_non_linear_target_is_refused():
    with pytest.raises(Exception, match="model.lora.target_modules"):
        add_lora(_base(False), LoraConfig(enabled=True, target_modules=["embed_tokens"]), NEW, seed=0)


# --- the real trainer (slow) ---

# warmup 1: DeepSpeed's WarmupDecayLR runs the first two steps at lr 0, so three steps move the adapters
E2E = ["optim.micro_batch_size=4", "optim.warmup_steps=1", "model.lora.enabled=true", "model.lora.r=2",
       "model.lora.export_adapter=true"]
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("world"))


def _weights(model_dir) -> dict:
    from safetensors.numpy import load_file

    return {k: v for f in sorted(model_dir.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def _unmerged(out) -> dict:
    """The export's adapted projections minus (alpha/r)·B@A from the adapter export: the frozen base."""
    merged, adapter = _weights(out / "model"), _weights(out / "adapter")
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    base = {}
    for key, a in adapter.items():
        if ".lora_A." in key:
            name = key[len("base_model.model."):key.index(".lora_A.")]
            b = adapter[key.replace(".lora_A.", ".lora_B.")]
            assert np.abs(b).max() > 0, f"{name}: B is still zero: the export equals the base there"
            base[name] = merged[name + ".weight"] - scale * (b @ a)
    return base


def _checkpoint_holds_only_what_trains(ckpt, export_bytes: int) -> None:
    from pipeline.checkpoint import safe_load

    for f in sorted(ckpt.glob("zero_pp_rank_*_model_states.pt")):
        state = safe_load(f)
        assert state["frozen_param_fragments"] is None
        # ZeRO-3 keeps a placeholder (empty) per parameter here; the values live in the optimizer files
        assert all(".lora_" in k or k.endswith(".delta") or v.numel() == 0 for k, v in state["module"].items())
    trained = sum(int(np.prod(s)) for group in state["param_shapes"] for s in group.values())
    held = sum(int(t.numel()) for f in ckpt.glob("zero_pp_rank_*_optim_states.pt")
               for t in safe_load(f)["optimizer_state_dict"]["fp32_flat_groups"])
    assert held == trained  # the fp32 copy of what trains, nothing else (padding aside, none at this size)
    # a full checkpoint would hold fp32 weights plus two Adam moments: three times the export
    assert sum(f.stat().st_size for f in ckpt.iterdir()) < export_bytes


@pytest.mark.slow
def test_zero3_two_ranks_checkpoint_only_what_trains_resume_exactly_and_export_merged(world, tmp_path):
    from transformers import AutoModelForCausalLM

    from onegen.errors import OneGenError
    from onegen.model_io import load_model

    out = tmp_path / "run"
    run(train_cmd("torchrun", world, out, "optim.max_steps=3", "checkpoint_every=3", *E2E))
    first, base = _weights(out / "model"), _unmerged(out)
    _checkpoint_holds_only_what_trains(out / "checkpoints" / "step-000003",
                                       sum(f.stat().st_size for f in (out / "model").glob("*.safetensors")))
    # resumed with nothing left to train: the export is rebuilt from the saved adapters, bit for bit
    again = run(train_cmd("torchrun", world, out, "optim.max_steps=3", "checkpoint_every=3", *E2E))
    assert "nothing left to train" in again.stdout
    assert all(np.array_equal(v, first[k]) for k, v in _weights(out / "model").items())

    later = run(train_cmd("torchrun", world, out, "optim.max_steps=5", "checkpoint_every=5", *E2E))
    assert "resuming from step-000003" in later.stdout
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]
    now = _weights(out / "model")
    for name, w in _unmerged(out).items():  # the frozen base is the same; what the adapters add moved
        np.testing.assert_allclose(w, base[name], atol=1e-6)
        assert not np.array_equal(now[name + ".weight"], first[name + ".weight"]), name
    assert set(base) == {k.rpartition(".")[0] for k in now if k.rpartition(".")[0].endswith(PROJ)}  # all adapted
    for key in ("model.norm.weight", "model.layers.0.input_layernorm.weight"):
        assert np.array_equal(now[key], first[key]), key
    tok = json.loads((out / "model" / "onegen_config.json").read_text())["special_token_ids"]
    emb_now, emb_first = now["model.embed_tokens.weight"], first["model.embed_tokens.weight"]
    old = [i for i in range(len(emb_now)) if i not in set(tok.values())]
    assert np.array_equal(emb_now[old], emb_first[old]) and not np.array_equal(emb_now, emb_first)

    model = AutoModelForCausalLM.from_pretrained(str(out / "model"), local_files_only=True)
    assert type(model).__name__ == "LlamaForCausalLM" and "lora" not in " ".join(model.state_dict())
    loaded, _ = load_model(out / "model")
    assert np.array_equal(loaded.state_dict()["model.layers.0.self_attn.q_proj.weight"].numpy(),
                          now["model.layers.0.self_attn.q_proj.weight"])
    with pytest.raises(OneGenError, match="built from a config"):
        load_model(out / "adapter")  # model.source=tiny: the adapter's base exists nowhere on disk


@pytest.mark.slow
def test_zero2_one_rank_trains_and_two_ranks_resume(world, tmp_path):
    from onegen.model_io import load_model

    out = tmp_path / "run"
    done = run(train_cmd("python", world, out, "optim.max_steps=3", "checkpoint_every=3",
                         "deepspeed=ds_configs/zero2.json", *E2E))
    assert "ZeRO-2" in done.stdout and "[train] done: step 3" in done.stdout
    two = tmp_path / "two"  # a ZeRO checkpoint is tied to its number of ranks: its own output dir
    run(train_cmd("torchrun", world, two, "optim.max_steps=3", "checkpoint_every=3", "deepspeed=ds_configs/zero2.json", *E2E))
    later = run(train_cmd("torchrun", world, two, "optim.max_steps=4", "deepspeed=ds_configs/zero2.json", *E2E))
    assert "resuming from step-000003" in later.stdout and "[train] done: step 4" in later.stdout
    model, _ = load_model(out / "model")
    assert not any("lora" in k for k in model.state_dict())
    assert _unmerged(out)


def test_resume_refuses_another_adapter_but_not_another_export_or_dropout(tmp_path):
    """A checkpoint holds adapters of one shape: a changed rank or target is refused before DeepSpeed
    fails on tensor shapes; exporting the adapter too, or another dropout, resumes."""
    import yaml

    from onegen.config import dump_yaml, load_config
    from onegen.errors import OneGenError
    from pipeline.config import TrainConfig
    from pipeline.train import _check_resume_config

    def cfg(*overrides: str) -> TrainConfig:
        return load_config(TrainConfig, None, [f"output_dir={tmp_path}", *overrides])

    (tmp_path / "config.yaml").write_text(dump_yaml(cfg("model.lora.enabled=true")))
    _check_resume_config(tmp_path, cfg("model.lora.enabled=true", "model.lora.export_adapter=true", "model.lora.dropout=0.1"))
    with pytest.raises(OneGenError, match="changed: model.lora.r"):
        _check_resume_config(tmp_path, cfg("model.lora.enabled=true", "model.lora.r=8"))
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    del saved["model"]["lora"]  # a run from before model.lora existed: trained without adapters
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    _check_resume_config(tmp_path, cfg())
    with pytest.raises(OneGenError, match="model.lora.enabled"):
        _check_resume_config(tmp_path, cfg("model.lora.enabled=true"))
