"""Export an HF-loadable model: safetensors weights, the tokenizer with the special tokens, the
OneGen config, and a manifest — what ``transformers.AutoModelForCausalLM.from_pretrained`` and the
evaluation stage load (``onegen.model_io.load_model``, re-exported here). Under ZeRO-3 the full
weights are first gathered from every rank; a LoRA model is exported with its adapters merged."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch.distributed as dist

from onegen.manifest import ONEGEN_CONFIG, fingerprint_files, write_manifest
from onegen.model_io import load_model
from pipeline.lora import is_lora, merged_state_dict, write_adapter
from pipeline.model import resolve_source

__all__ = ["export_model", "load_model"]


def export_model(engine, model, tokenizer, out_dir: Path, *, cfg, tokens, data, tokenizer_fp: str, step: int,
                 run_id: str | None, zero3: bool) -> Path | None:
    """Rank 0 writes ``out_dir`` (every rank must call it). A LoRA model (``pipeline.lora``) is exported
    merged; with ``model.lora.export_adapter`` its adapter alone also goes to ``adapter/`` beside it."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    if zero3:
        state = engine._zero3_consolidated_16bit_state_dict()  # collective: every rank must call it
    else:
        state = engine.module.state_dict() if rank == 0 else None
    if rank != 0:
        dist.barrier()
        return None
    prefix = "lm."
    state = {k[len(prefix):] if k.startswith(prefix) else k: v.detach().cpu().contiguous() for k, v in state.items()}
    meta = dict(cfg=cfg, tokens=tokens, data=data, tokenizer_fp=tokenizer_fp, step=step, run_id=run_id)
    if is_lora(model):
        if cfg.model.lora.export_adapter:
            base = resolve_source(cfg.model)
            _write_dir(out_dir.with_name("adapter"), tokenizer,
                       lambda tmp: write_adapter(model, state, tmp, cfg.model.lora, base),
                       extra={"adapter": "lora", "base_model": base}, **meta)
        model, state = model.get_base_model(), merged_state_dict(model, state)
    _write_dir(out_dir, tokenizer, lambda tmp: model.save_pretrained(str(tmp), state_dict=state, safe_serialization=True),
               **meta)
    if dist.is_initialized():
        dist.barrier()
    return out_dir


def _write_dir(out_dir: Path, tokenizer, write_weights: Callable[[Path], None], *, cfg, tokens,
               data, tokenizer_fp: str, step: int, run_id: str | None, extra: dict | None = None) -> None:
    """Weights, tokenizer, OneGen config and manifest into a temporary dir, then renamed to ``out_dir``."""
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_weights(tmp)
    tokenizer.save_pretrained(str(tmp))
    onegen_cfg = {
        "special_tokens": tokens.to_dict(),
        "special_token_ids": {t: tokenizer.convert_tokens_to_ids(t) for t in tokens.all_tokens()},
        "mode": cfg.loss.mode,
        "task": sorted({d.task for d in data}),
        "train_config": asdict(cfg),
        "tokenizer_fingerprint": tokenizer_fp,
        "data_fingerprints": [d.fingerprint for d in data],
        "templates": data[0].manifest["config"]["tagging"],
        "step": step,
        "mlflow_run_id": run_id,
    }
    extra = extra or {}
    onegen_cfg.update(extra)
    (tmp / ONEGEN_CONFIG).write_text(json.dumps(onegen_cfg, indent=2, default=str))
    weights = sorted(p.name for p in tmp.iterdir() if p.suffix == ".safetensors")
    write_manifest(tmp, "train", fingerprint=fingerprint_files(tmp, weights), model_source=cfg.model.source,
                   mode=cfg.loss.mode, step=step, tokenizer_fingerprint=tokenizer_fp,
                   data_fingerprints=onegen_cfg["data_fingerprints"], mlflow_run_id=run_id, **extra)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
