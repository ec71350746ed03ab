"""Loading a model export (what ``pipeline.export`` writes): the model and its tokenizer, with plain
transformers, offline, from safetensors only. Evaluation loads checkpoints through here (``evaluation.runtime``).
"""

from __future__ import annotations

from pathlib import Path

import torch


def load_model(model_dir: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32,
               attn_implementation: str | None = None):
    """The exported model and its tokenizer, loaded with plain transformers (no pickle: safetensors).

    ``attn_implementation``: ``sdpa`` / ``eager`` / ``flash_attention_2`` (decide it with
    ``onegen.devices.choose_attention``); None = transformers' default (sdpa where the model has it).
    """
    # heavy (transformers): imported where a model is loaded
    from transformers import AutoModelForCausalLM, AutoTokenizer

    attn = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, local_files_only=True,
                                                 trust_remote_code=False, use_safetensors=True, **attn).to(device)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model.eval()
    return model, tokenizer
