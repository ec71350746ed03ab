"""Loading a model export (what ``pipeline.export`` writes): the model and its tokenizer, with plain
transformers, offline, from safetensors only. Evaluation loads checkpoints through here (``evaluation.runtime``).

A LoRA adapter export (``model.lora.export_adapter``: ``adapter_config.json``, no ``config.json``) loads
too: its base model (a local directory, named in the adapter's config), resized to the tokenizer's
length, with the adapter merged by peft. An adapter of a model built from a config (``model.source=tiny``)
has no base on disk: load the merged export beside it instead.
"""

from __future__ import annotations

from pathlib import Path

import torch

from onegen.errors import OneGenError


def load_model(model_dir: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32,
               attn_implementation: str | None = None):
    """The exported model and its tokenizer, loaded with plain transformers (no pickle: safetensors).

    ``attn_implementation``: ``sdpa`` / ``eager`` / ``flash_attention_2`` (decide it with
    ``onegen.devices.choose_attention``); None = transformers' default (sdpa where the model has it).
    """
    # heavy (transformers): imported where a model is loaded
    from transformers import AutoModelForCausalLM, AutoTokenizer

    attn = {"attn_implementation": attn_implementation} if attn_implementation else {}
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    is_adapter = (Path(model_dir) / "adapter_config.json").exists() and not (Path(model_dir) / "config.json").exists()
    source = _adapter_base(Path(model_dir)) if is_adapter else model_dir
    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=dtype, local_files_only=True,
                                                 trust_remote_code=False, use_safetensors=True, **attn)
    if is_adapter:
        model = _merge_adapter(model, model_dir, len(tokenizer))
    model = model.to(device)
    model.eval()
    return model, tokenizer


def _adapter_base(adapter_dir: Path) -> str:
    # heavy (peft): imported where an adapter is loaded
    from peft import PeftConfig

    base = PeftConfig.from_pretrained(str(adapter_dir)).base_model_name_or_path
    if not base or not Path(base).is_dir():
        raise OneGenError(f"{adapter_dir} is a LoRA adapter whose base model ({base or 'none: it was built from a config'}) "
                          "is not a local directory; load the merged export (the 'model' dir beside it) instead")
    return base


def _merge_adapter(model, adapter_dir: str | Path, vocab: int):
    # heavy (peft): imported where an adapter is loaded
    from peft import PeftModel

    if vocab > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(vocab, mean_resizing=False)  # the new tokens' rows come with the adapter
    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False).merge_and_unload()
