"""``model.train_layers``: only the top N blocks (and the LM head) train, and no graph is recorded below them."""

from __future__ import annotations

import pytest
import torch
import transformers

from onegen.hidden import decoder_of
from pipeline.config import TrainConfig
from pipeline.model import freeze_below


def _model(tied: bool) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                                   num_key_value_heads=2, vocab_size=50, tie_word_embeddings=tied)
    return transformers.LlamaForCausalLM(cfg)


@pytest.mark.parametrize("tied", [True, False])
def test_only_the_top_blocks_and_the_head_get_gradients(tied):
    model = _model(tied)
    assert freeze_below(model, 1) == 3
    ids = torch.randint(0, 50, (2, 7))
    model(input_ids=ids, labels=ids).loss.backward()
    layers = decoder_of(model).layers
    for layer in layers[:3]:
        assert all(p.grad is None and not p.requires_grad for p in layer.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layers[3].parameters())
    head = model.get_output_embeddings().weight
    assert head.grad is not None and head.grad.abs().sum() > 0  # tied: the embedding trains through the head
    if not tied:
        assert not model.get_input_embeddings().weight.requires_grad


def test_nothing_below_the_trained_blocks_is_recorded():
    model = _model(True)
    freeze_below(model, 2)
    seen = {}
    layers = decoder_of(model).layers
    for i, layer in enumerate(layers):
        layer.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, (out[0] if isinstance(out, tuple) else out).requires_grad))
    model(input_ids=torch.randint(0, 50, (1, 5)))
    assert seen == {0: False, 1: False, 2: True, 3: True}


def test_train_layers_zero_or_all_freezes_nothing_and_negative_is_refused():
    model = _model(True)
    assert freeze_below(model, 4) == 0 and all(p.requires_grad for p in model.parameters())
    with pytest.raises(Exception, match="model.train_layers"):
        TrainConfig(model=TrainConfig().model.__class__(train_layers=-1))
