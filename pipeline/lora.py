"""``model.lora``: LoRA adapters (peft) on a frozen base, plus trainable rows for the new special tokens.

The base stays frozen; peft's LoRA layers add ``(alpha/r)·B@A`` to the targeted projections. The new
tokens ([RQ], [RD], …) have no useful base rows, so their input-embedding and LM-head rows train too —
only those rows: ``NewTokenEmbedding`` adds a ``[n_new, H]`` delta (zero at start, so the model is the
base at step 0) to the embedding output of the new ids, and ``NewTokenHead`` adds ``h @ delta.T`` to
the logits of the new ids. A tied head shares the embedding's delta. peft's own TrainableTokensLayer
is not used in training: under ZeRO-3 it gathers the whole ``[V, H]`` matrix on a CUDA device every
forward; its *file format* is what ``write_adapter`` exports (the rows' final values), so the adapter
loads with plain peft.

Export (``merged_state_dict``): a plain HF state dict, each adapted weight ``W + (alpha/r)·B@A`` and the
new rows written into the embedding / head; computed on rank 0 from the full (gathered) state dict.

peft and transformers are imported inside the functions that use them (``# lazy``), as in ``pipeline.model``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from onegen.config import FieldError
from onegen.errors import ConfigError
from pipeline.config import LoraConfig, ModelConfig

ADAPTER = "default"  # peft's adapter name: the keys' ".default." part
PEFT_PREFIX = "base_model.model."  # what PeftModel adds before the base model's own parameter names


class NewTokenEmbedding(torch.nn.Module):
    """The frozen embedding, plus a trainable delta on the rows of ``ids`` (sorted)."""

    def __init__(self, base: torch.nn.Embedding, ids: list[int]):
        super().__init__()
        self.base = base
        weight = base.weight
        self.delta = torch.nn.Parameter(torch.zeros(len(ids), base.embedding_dim, dtype=weight.dtype, device=weight.device))
        # not persistent: rebuilt from the tokenizer, so checkpoints hold only what trains
        self.register_buffer("ids", torch.tensor(sorted(ids), dtype=torch.long, device=weight.device), persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.base(input_ids)
        ids = self.ids.to(input_ids.device)  # ZeRO-3 places parameters itself, not buffers: no-op once there
        pos = torch.searchsorted(ids, input_ids).clamp_(max=len(ids) - 1)
        hit = (ids[pos] == input_ids).unsqueeze(-1).to(out.dtype)
        return out + self.delta[pos].to(out.dtype) * hit


class NewTokenHead(torch.nn.Module):
    """The frozen LM head, plus ``h @ delta.T`` on the logits of ``ids``; ``delta`` is the embedding's when tied."""

    def __init__(self, base: torch.nn.Linear, ids: list[int], delta: torch.nn.Parameter | None = None):
        super().__init__()
        self.base = base
        weight = base.weight
        self.tied = delta is not None
        self.delta = delta if delta is not None else torch.nn.Parameter(
            torch.zeros(len(ids), base.in_features, dtype=weight.dtype, device=weight.device))
        self.register_buffer("ids", torch.tensor(sorted(ids), dtype=torch.long, device=weight.device), persistent=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.base(hidden)
        return logits.index_add(-1, self.ids.to(logits.device), (hidden @ self.delta.t()).to(logits.dtype))


def add_lora(model: torch.nn.Module, cfg: LoraConfig, new_ids: list[int], seed: int) -> torch.nn.Module:
    """Wrap ``model`` in peft LoRA adapters (everything else frozen) and make the ``new_ids`` rows trainable.

    Returns the ``PeftModel``; its ``get_input_embeddings()`` / ``get_output_embeddings()`` are the
    ``NewToken*`` modules, and ``onegen.hidden.decoder_of`` finds the decoder through it."""
    # lazy: see module docstring
    from peft import LoraConfig as PeftLoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer, Linear as LoraLinear  # lazy: as above

    torch.manual_seed(seed)  # the adapters' start is the seed's, on every rank
    peft_cfg = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                              target_modules=list(cfg.target_modules), task_type="CAUSAL_LM")
    # autocast off: adapters in the base's dtype (DeepSpeed's ZeRO-3 flat groups hold one dtype)
    peft_model = get_peft_model(model, peft_cfg, autocast_adapter_dtype=False)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and (not isinstance(module, LoraLinear) or module.fan_in_fan_out
                                              or module is emb or module is head):
            raise ConfigError(f"model.lora.target_modules: {name} ({type(module).__name__}) is not a plain Linear "
                              "projection; target attention/MLP projections (the embeddings' new rows train anyway)")
    if new_ids:
        tied = head is not None and head.weight is emb.weight
        new_emb = NewTokenEmbedding(emb, new_ids)
        model.set_input_embeddings(new_emb)
        if head is not None:
            model.set_output_embeddings(NewTokenHead(head, new_ids, new_emb.delta if tied else None))
    return peft_model


def is_lora(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def _numel(p: torch.nn.Parameter) -> int:
    return int(getattr(p, "ds_numel", p.numel()))  # ZeRO-3: the full size, not this rank's partition


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, each shared parameter counted once."""
    params = list(model.parameters())
    return sum(_numel(p) for p in params if p.requires_grad), sum(_numel(p) for p in params)


def _layers(model: torch.nn.Module) -> tuple[dict[str, float], dict[str, Any]]:
    """The LoRA layers' scales and the new-row modules, by name in the base model's state dict."""
    # lazy: see module docstring
    from peft.tuners.lora import LoraLayer

    scales, rows = {}, {}
    for name, module in model.get_base_model().named_modules():
        if isinstance(module, LoraLayer):
            scales[name] = float(module.scaling[ADAPTER])
        elif isinstance(module, (NewTokenEmbedding, NewTokenHead)):
            rows[name] = module
    return scales, rows


def _strip(key: str) -> str:
    return key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key


def _with_rows(weight: torch.Tensor, ids: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    out = weight.clone()
    out[ids] = (weight[ids].float() + delta.float()).to(weight.dtype)
    return out


def merged_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The plain HF state dict of ``model`` (a PeftModel from ``add_lora``) with everything merged.

    ``state``: its full state dict (keys as ``model.state_dict()`` names them, e.g. gathered from ZeRO-3)."""
    scales, rows = _layers(model)
    state = {_strip(k): v for k, v in state.items()}
    out, merged_rows = {}, {}  # a tied head's matrix is the embedding's: merged once, stays one tensor
    for key, value in state.items():
        module, _, leaf = key.rpartition(".")
        if ".lora_" in key or (leaf == "delta" and module in rows):
            continue
        if module.endswith(".base_layer") and module[:-len(".base_layer")] in scales:
            name = module[:-len(".base_layer")]
            if leaf == "weight":
                a, b = state[f"{name}.lora_A.{ADAPTER}.weight"], state[f"{name}.lora_B.{ADAPTER}.weight"]
                value = (value.float() + scales[name] * (b.float() @ a.float())).to(value.dtype)
            out[f"{name}.{leaf}"] = value
        elif module.endswith(".base") and module[:-len(".base")] in rows:
            name = module[:-len(".base")]
            delta = state[f"{name}.delta"]
            if leaf == "weight" and (value.data_ptr(), delta.data_ptr()) not in merged_rows:
                merged_rows[value.data_ptr(), delta.data_ptr()] = _with_rows(value, rows[name].ids.cpu(), delta)
            out[f"{name}.{leaf}"] = merged_rows[value.data_ptr(), delta.data_ptr()] if leaf == "weight" else value
        else:
            out[key] = value
    return out


def write_adapter(model: torch.nn.Module, state: dict[str, torch.Tensor], out_dir: Path, cfg: LoraConfig,
                  base: str | None) -> None:
    """The adapter alone, in peft's format (``PeftModel.from_pretrained`` loads it on ``base``).

    The new tokens' rows travel as peft's ``trainable_token_indices`` (their final values, base row +
    delta); the base must first be resized to the tokenizer's length (``onegen.model_io`` does)."""
    # lazy: see module docstring
    from peft import LoraConfig as PeftLoraConfig

    _, rows = _layers(model)
    state = {_strip(k): v for k, v in state.items()}
    tensors = {PEFT_PREFIX + k.replace(f".{ADAPTER}.", "."): v.contiguous() for k, v in state.items() if ".lora_" in k}
    indices = {}
    for name, module in rows.items():
        if isinstance(module, NewTokenHead) and module.tied:
            continue  # peft ties the head to the embedding's rows itself
        ids = module.ids.cpu()
        tensors[f"{PEFT_PREFIX}{name}.token_adapter.trainable_tokens_delta"] = _with_rows(
            state[f"{name}.base.weight"], ids, state[f"{name}.delta"])[ids].contiguous()
        indices[name.rpartition(".")[2]] = ids.tolist()
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    peft_cfg = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.target_modules),
                              task_type="CAUSAL_LM", trainable_token_indices=indices or None, base_model_name_or_path=base)
    peft_cfg.save_pretrained(str(out_dir))
