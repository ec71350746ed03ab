"""The GPU path, checked on CPU: what would break on GPUs and clusters fails a test here first.

- every collective goes through ``onegen.distributed``, whose tensors are built on the device it is
  given (NCCL refuses CPU tensors; gloo, used by every CPU test, accepts them and hides the bug);
- ZeRO bucket sizes follow the loaded model's hidden size, as transformers computes them;
- a new token is new by the tokenizer's length, not the embedding matrix's (Qwen2 pads its matrix);
- fused Adam and overlapped communication on CUDA, torch AdamW on CPU;
- the CUDA RNG state is saved and restored;
- the periodic entity-linking evaluation ranks a bounded candidate set and says so.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

import onegen.distributed as collectives
from onegen.config import load_config
from pipeline.config import TrainConfig
from pipeline.ds_config import fill_auto, load_ds_config

ROOT = Path(__file__).resolve().parent.parent
COLLECTIVES = {"all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce", "reduce_scatter",
               "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "gather", "scatter", "all_gather_object",
               "broadcast_object_list"}


class Reached(Exception):
    """Raised by the recording collective: the tensor reached it (a meta tensor holds no value to go on with)."""


@pytest.fixture
def recorded(monkeypatch):
    seen: list[torch.device] = []

    def record(t, *args, **kwargs):
        seen.append(t.device)
        raise Reached

    monkeypatch.setattr(collectives, "initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    monkeypatch.setattr(dist, "all_reduce", record)
    return seen


@pytest.mark.parametrize("call", [lambda d: collectives.sum_across_ranks([1.0, 2.0], d),
                                  lambda d: collectives.any_rank(True, d)], ids=["sum_across_ranks", "any_rank"])
def test_collective_tensors_are_built_on_the_device_they_are_given(recorded, call):
    # "meta" is never torch's default device: a tensor built without device= would arrive on the CPU
    with pytest.raises(Reached):
        call(torch.device("meta"))
    assert recorded == [torch.device("meta")]


def test_a_cpu_tensor_in_an_nccl_collective_is_refused_with_the_reason(monkeypatch):
    monkeypatch.setattr(collectives, "initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(dist, "all_reduce", lambda *a, **k: pytest.fail("reached the collective"))
    with pytest.raises(RuntimeError, match="cpu tensor was handed to a nccl collective"):
        collectives.sum_across_ranks([1.0], "cpu")


def _calls(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            yield node


def test_no_collective_bypasses_onegen_distributed():
    """A new ``dist.all_reduce(...)`` anywhere else would skip the device rule: it fails here."""
    wrapper = ROOT / "onegen" / "distributed.py"
    bad = []
    for folder in ("onegen", "data_prep", "pipeline", "evaluation", "bench"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path == wrapper:
                continue
            for call in _calls(path):
                base = ast.unparse(call.func.value)
                if call.func.attr in COLLECTIVES and base in ("dist", "torch.distributed", "torch.distributed.nn.functional"):
                    bad.append(f"{path.relative_to(ROOT)}:{call.lineno} {ast.unparse(call.func)}")
                if call.func.attr in ("sum_across_ranks", "any_rank"):
                    device = call.args[1] if len(call.args) > 1 else next((k.value for k in call.keywords if k.arg == "device"), None)
                    if device is None or (isinstance(device, ast.Constant) and device.value == "cpu"):
                        bad.append(f"{path.relative_to(ROOT)}:{call.lineno} {ast.unparse(call)} (device)")
    assert not bad, "collectives outside onegen.distributed or without the engine's device:\n" + "\n".join(bad)


def _model_dir(tmp_path: Path, name: str, config) -> Path:
    d = tmp_path / name
    config.save_pretrained(d)  # the config alone: no weights are needed to size the buckets
    return d


def _transformers_buckets(config) -> dict:
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    keys = ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold")
    hf = HfTrainerDeepSpeedConfig({"zero_optimization": {"stage": 3, **{k: "auto" for k in keys}}})
    hf.trainer_config_finalize(SimpleNamespace(get_warmup_steps=lambda n: 0), SimpleNamespace(config=config), 10)
    return hf.config["zero_optimization"]


@pytest.mark.parametrize("recipe,config", [
    ("qwen2-1.5b-multihop.yaml", lambda: __import__("transformers").Qwen2Config(
        hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
        vocab_size=151936)),
    ("llama3.1-8b-multihop.yaml", lambda: __import__("transformers").LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        vocab_size=128256)),
], ids=["qwen2-1.5b", "llama3.1-8b"])
def test_zero3_buckets_follow_the_loaded_model_as_transformers_computes_them(tmp_path, recipe, config):
    from pipeline.model import model_config, model_hidden_size

    hf_config = config()
    cfg = load_config(TrainConfig, ROOT / "configs" / recipe, [f"model.source={_model_dir(tmp_path, 'm', hf_config)}"])
    hidden = model_hidden_size(model_config(cfg.model, tokenizer=None))
    filled = fill_auto(load_ds_config(ROOT / cfg.deepspeed), micro_batch=cfg.optim.micro_batch_size,
                       grad_accum=cfg.optim.grad_accum, world_size=8, lr=cfg.optim.lr, weight_decay=0.0,
                       warmup_steps=0, total_steps=100, grad_clip=1.0, bf16=True, hidden_size=hidden,
                       betas=cfg.optim.betas, cuda=True)["zero_optimization"]
    want = _transformers_buckets(hf_config)
    assert hidden == hf_config.hidden_size != cfg.model.hidden_size  # not the tiny-model field
    for key, value in want.items():
        if key != "stage":
            assert filled[key] == value, key
    assert filled["reduce_bucket_size"] == hf_config.hidden_size ** 2


def test_fill_on_cuda_takes_fused_adam_and_overlap_and_on_cpu_torch_adam():
    ds = load_ds_config(ROOT / "ds_configs" / "zero3.json")
    common = dict(micro_batch=1, grad_accum=1, world_size=1, lr=1e-5, weight_decay=0.0, warmup_steps=0,
                  total_steps=10, grad_clip=1.0, bf16=True, hidden_size=64, betas=[0.9, 0.999])
    gpu, cpu = fill_auto(ds, **common, cuda=True), fill_auto(ds, **common, cuda=False)
    assert gpu["optimizer"]["params"]["torch_adam"] is False  # DeepSpeed's FusedAdam (CPU Adam with offload)
    assert gpu["zero_optimization"]["overlap_comm"] is True
    assert cpu["optimizer"]["params"]["torch_adam"] is True and cpu["zero_optimization"]["overlap_comm"] is False
    assert gpu["optimizer"]["params"]["betas"] == [0.9, 0.999]
    # DeepSpeed >= 0.19.6 refuses a warm-up of 0 steps: "no warm-up" must still build a scheduler
    assert gpu["scheduler"]["params"]["warmup_num_steps"] >= 1
    offload = fill_auto(load_ds_config(ROOT / "ds_configs" / "zero3_offload.json"), **common, cuda=True)
    assert offload["zero_optimization"]["offload_optimizer"]["pin_memory"] is True
    assert offload["optimizer"]["params"]["torch_adam"] is False


def _bpe_tokenizer():
    from data_prep.tokenizer import train_bpe

    texts = ["information of question document entity mention paragraph start end continue"] * 20
    return train_bpe(texts, vocab_size=120)


def test_new_tokens_of_a_padded_qwen2_vocabulary_are_initialised(tmp_path):
    """Qwen2 pads its embedding matrix past its tokenizer: the OneGen ids fall inside the matrix and
    must still get the description-mean rows."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from onegen.tokens import SpecialTokens, add_special_tokens, base_vocab_size
    from pipeline.config import ModelConfig
    from pipeline.model import build_model

    base = _bpe_tokenizer()
    n_base = len(base)
    torch.manual_seed(0)
    model_dir = tmp_path / "qwen2-padded"
    Qwen2ForCausalLM(Qwen2Config(vocab_size=n_base + 64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False,
                                 pad_token_id=base.pad_token_id, eos_token_id=base.eos_token_id)).save_pretrained(model_dir)
    base.save_pretrained(model_dir)
    tokens = SpecialTokens()
    tok = _bpe_tokenizer()
    ids = add_special_tokens(tok, tokens)
    assert base_vocab_size(tok, tokens) == n_base and max(ids.values()) < n_base + 64  # inside the padded matrix

    model = build_model(ModelConfig(source=str(model_dir), dtype="fp32"), tok, seed=0, init_new_tokens=tokens)
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert emb.shape[0] == n_base + 64  # no resize: the padded rows were there
    for key in tokens.KEYS:
        tid = tok.convert_tokens_to_ids(getattr(tokens, key))
        sub = [i for i in tok(tokens.descriptions[key], add_special_tokens=False)["input_ids"] if i < n_base]
        assert torch.allclose(emb[tid], emb[sub].mean(0)), key
        assert torch.allclose(head[tid], head[sub].mean(0)), key


def test_cuda_rng_state_is_saved_and_restored(monkeypatch):
    from pipeline import checkpoint

    state = {"cuda": [torch.arange(4, dtype=torch.uint8)]}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in state["cuda"]])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: state.update(cuda=list(states)))
    saved = checkpoint.rng_state()
    assert torch.equal(saved["cuda_rng"][0], torch.arange(4, dtype=torch.uint8))
    state["cuda"] = [torch.zeros(4, dtype=torch.uint8)]  # the generator moves on ...
    checkpoint.restore_rng(saved)  # ... and a resume puts it back
    assert torch.equal(state["cuda"][0], torch.arange(4, dtype=torch.uint8))


def test_rng_states_pass_the_weights_only_loader(tmp_path, monkeypatch):
    from pipeline import checkpoint

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [torch.arange(8, dtype=torch.uint8)])
    torch.save({"step": 3, **checkpoint.rng_state()}, tmp_path / "client.pt")
    loaded = checkpoint.safe_load(tmp_path / "client.pt")
    assert loaded["step"] == 3 and torch.equal(loaded["cuda_rng"][0], torch.arange(8, dtype=torch.uint8))


def test_periodic_el_evaluation_samples_a_bounded_kb_with_every_positive():
    from pipeline.teacher_forced import kb_candidates

    kb = [f"e{i:05d}" for i in range(10_000)]
    positives = ["e00007", "e09999", "e04242"]
    cands, sampled = kb_candidates(kb, positives, 500, seed=1)
    assert sampled and len(cands) == 500 and set(positives) <= set(cands) and cands == sorted(cands)
    assert kb_candidates(kb, positives, 500, seed=1) == (cands, True)  # every rank encodes the same list
    assert kb_candidates(kb[:300], positives[:1], 500, seed=1) == (kb[:300], False)


def test_recipe_betas_and_epochs_reach_the_run():
    cfg = load_config(TrainConfig, None, ["optim.betas=[0.9,0.999]", "optim.epochs=3"])
    assert cfg.optim.betas == [0.9, 0.999] and cfg.optim.epochs == 3
    with pytest.raises(Exception, match="optim.betas"):
        load_config(TrainConfig, None, ["optim.betas=[0.9]"])


def test_ds_configs_defer_device_choices_to_the_trainer():
    for path in sorted((ROOT / "ds_configs").glob("*.json")):
        cfg = json.loads(path.read_text())
        assert cfg["optimizer"]["params"]["torch_adam"] == "auto", path.name
        assert cfg["zero_optimization"]["overlap_comm"] == "auto", path.name
