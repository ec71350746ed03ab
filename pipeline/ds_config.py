"""DeepSpeed JSON configs: load, reject unknown keys, fill the ``"auto"`` values the trainer knows.

DeepSpeed silently ignores a misspelled top-level key (``"gradient_clippping"`` trains without
clipping), so every key is checked against what DeepSpeed reads; the ``zero_optimization``
section is additionally validated by DeepSpeed's own (strict) pydantic model once filled.
"""

from __future__ import annotations

import copy
import difflib
import json
from pathlib import Path
from typing import Any

from onegen.errors import ConfigError

# Top-level keys DeepSpeed reads (deepspeed/runtime/config.py and its constants), as used here.
TOP_LEVEL = {
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
    "steps_per_print", "wall_clock_breakdown", "dump_state", "prescale_gradients", "gradient_predivide_factor",
    "sparse_gradients", "bf16", "fp16", "amp", "optimizer", "scheduler", "zero_optimization", "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer", "activation_checkpointing", "communication_data_type", "seq_parallel_communication_data_type",
    "memory_breakdown", "flops_profiler", "tensorboard", "wandb", "csv_monitor", "comet", "checkpoint", "data_types",
    "elasticity", "aio", "load_universal_checkpoint", "disable_allgather", "torch_autocast", "compile",
}
SECTIONS = {
    "bf16": {"enabled", "immediate_grad_update", "check_grad_overflow", "bf16_master_weights_and_grads", "bf16_optimizer_states"},
    "fp16": {"enabled", "auto_cast", "loss_scale", "initial_scale_power", "loss_scale_window", "hysteresis",
             "consecutive_hysteresis", "min_loss_scale", "fp16_master_weights_and_grads"},
    "optimizer": {"type", "params"},
    "scheduler": {"type", "params"},
    "activation_checkpointing": {"partition_activations", "cpu_checkpointing", "contiguous_memory_optimization",
                                 "number_checkpoints", "synchronize_checkpoint_boundary", "profile"},
    "checkpoint": {"tag_validation", "load_universal", "use_node_local_storage", "parallel_write", "writer"},
}
OPTIMIZER_PARAMS = {"lr", "betas", "eps", "weight_decay", "torch_adam", "adam_w_mode", "fused", "momentum", "amsgrad"}
SCHEDULER_PARAMS = {
    "WarmupDecayLR": {"warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "total_num_steps", "warmup_type"},
    "WarmupLR": {"warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type"},
    "WarmupCosineLR": {"total_num_steps", "warmup_min_ratio", "warmup_num_steps", "cos_min_ratio", "warmup_type"},
}


def _unknown(path: str, key: str, known: set[str], file: str) -> ConfigError:
    close = difflib.get_close_matches(key, sorted(known), n=1)
    hint = f" (did you mean {path + close[0]!r}?)" if close else ""
    return ConfigError(f"{file}: unknown DeepSpeed key {path + key!r}{hint}; DeepSpeed would silently ignore it")


def _zero_keys() -> set[str]:
    """Every key DeepSpeed's ZeRO config accepts: its field names and their aliases (``stage3_*``)."""
    # heavy (deepspeed): imported only when a config with a ZeRO section is checked
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    return {n for name, f in DeepSpeedZeroConfig.model_fields.items() for n in (name, f.alias) if n}


def validate_keys(cfg: dict[str, Any], file: str = "DeepSpeed config") -> None:
    for key, value in cfg.items():
        if key not in TOP_LEVEL:
            raise _unknown("", key, TOP_LEVEL, file)
        if key in SECTIONS and isinstance(value, dict):
            for sub in value:
                if sub not in SECTIONS[key]:
                    raise _unknown(f"{key}.", sub, SECTIONS[key], file)
    for sub in (cfg.get("optimizer") or {}).get("params", {}):
        if sub not in OPTIMIZER_PARAMS:
            raise _unknown("optimizer.params.", sub, OPTIMIZER_PARAMS, file)
    sched = cfg.get("scheduler") or {}
    if sched:
        known = SCHEDULER_PARAMS.get(sched.get("type"))
        if known is None:
            raise ConfigError(f"{file}: scheduler type {sched.get('type')!r} is not one of {sorted(SCHEDULER_PARAMS)}")
        for sub in sched.get("params", {}):
            if sub not in known:
                raise _unknown("scheduler.params.", sub, known, file)
    zero = cfg.get("zero_optimization")
    if zero:
        # heavy (deepspeed): as in _zero_keys
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

        known_zero = _zero_keys()
        for sub in zero:  # first by name, with a suggestion (pydantic's message has none)
            if sub not in known_zero:
                raise _unknown("zero_optimization.", sub, known_zero, file)

        probe = {k: (1 if v == "auto" else v) for k, v in zero.items()}
        for k in ("offload_optimizer", "offload_param"):
            if isinstance(probe.get(k), dict):
                probe[k] = {kk: (False if vv == "auto" else vv) for kk, vv in probe[k].items()}
        try:
            DeepSpeedZeroConfig(**probe)
        except Exception as e:  # pydantic's message names the bad field
            first = str(e).splitlines()[1:3]
            raise ConfigError(f"{file}: zero_optimization: {' '.join(s.strip() for s in first)}") from None


def load_ds_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"DeepSpeed config {path} does not exist (see ds_configs/)")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None
    validate_keys(cfg, str(path))
    return cfg


def fill_auto(cfg: dict[str, Any], *, micro_batch: int, grad_accum: int, world_size: int, lr: float,
              weight_decay: float, warmup_steps: int, total_steps: int, grad_clip: float, bf16: bool,
              hidden_size: int, betas: tuple[float, float] | list[float] = (0.9, 0.95),
              cuda: bool | None = None) -> dict[str, Any]:
    """Replace every ``"auto"`` with the value the trainer decided; unknown ``"auto"`` is an error.

    ``hidden_size`` is the *loaded model's* (its config's ``hidden_size``, see
    ``pipeline.model.model_hidden_size``): the ZeRO bucket sizes and persistence threshold follow it
    exactly as transformers' own DeepSpeed integration computes them. ``cuda`` (default: whether a
    CUDA device is present) picks the optimizer kernel: on GPUs DeepSpeed's fused Adam (its CPU Adam
    when the optimizer is offloaded) and overlapped communication; on CPU plain torch AdamW, since
    DeepSpeed's fused CPU optimizers JIT-compile for ~45 s (design §3).
    """
    cuda = _cuda() if cuda is None else cuda
    c = copy.deepcopy(cfg)
    known = {
        ("train_micro_batch_size_per_gpu",): micro_batch,
        ("gradient_accumulation_steps",): grad_accum,
        ("train_batch_size",): micro_batch * grad_accum * world_size,
        ("gradient_clipping",): grad_clip,
        ("bf16", "enabled"): bf16,
        ("optimizer", "params", "lr"): lr,
        ("optimizer", "params", "weight_decay"): weight_decay,
        ("optimizer", "params", "betas"): [float(b) for b in betas],
        ("optimizer", "params", "torch_adam"): not cuda,
        ("zero_optimization", "overlap_comm"): cuda,
        ("scheduler", "params", "warmup_max_lr"): lr,
        # DeepSpeed >= 0.19.6 refuses 0 and warms up over at least 2 steps anyway: "no warm-up" runs as 1
        ("scheduler", "params", "warmup_num_steps"): max(1, min(warmup_steps, max(total_steps - 1, 1))),
        ("scheduler", "params", "total_num_steps"): max(total_steps, 2),
        ("zero_optimization", "reduce_bucket_size"): hidden_size * hidden_size,
        ("zero_optimization", "allgather_bucket_size"): max(hidden_size * hidden_size, int(5e8) if hidden_size > 1024 else int(5e7)),
        ("zero_optimization", "stage3_prefetch_bucket_size"): int(0.9 * hidden_size * hidden_size),
        ("zero_optimization", "stage3_param_persistence_threshold"): 10 * hidden_size,
        ("zero_optimization", "offload_optimizer", "pin_memory"): cuda,
        ("zero_optimization", "offload_param", "pin_memory"): cuda,
    }

    def walk(node: Any, path: tuple[str, ...]) -> Any:
        if isinstance(node, dict):
            return {k: walk(v, path + (k,)) for k, v in node.items()}
        if node == "auto":
            if path not in known:
                raise ConfigError(f"DeepSpeed config: the trainer does not know a value for 'auto' at {'.'.join(path)}")
            return known[path]
        return node

    return walk(c, ())


def _cuda() -> bool:
    # heavy (torch): imported where used, so reading a DeepSpeed config stays light
    import torch

    return torch.cuda.is_available()


def zero_stage(cfg: dict[str, Any]) -> int:
    return int((cfg.get("zero_optimization") or {}).get("stage", 0))
