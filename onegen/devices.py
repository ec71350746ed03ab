"""Where and how a model runs: device, dtype and attention kernel, decided in one place for every stage.

Rules (design §8): bf16 on a GPU that supports it, else fp32; ``flash_attention_2`` only with
fp16/bf16 on CUDA (flash-attn has no fp32 kernel and fails at the first forward); a flash-attn that
was asked for but cannot be used (not installed, built for another torch/CUDA, fp32) is an error,
never a silent fall back to sdpa.
"""

from __future__ import annotations

import importlib.util
import logging

import torch

from onegen.errors import ConfigError

log = logging.getLogger("onegen.devices")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ATTENTIONS = ("auto", "sdpa", "eager", "flash_attention_2")
FLASH = "flash_attention_2"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def choose_dtype(requested: str = "auto", device: str | None = None) -> torch.dtype:
    """``auto``: bf16 on a CUDA device that supports it, else fp32; or the named dtype."""
    if requested in DTYPES:
        return DTYPES[requested]
    if requested != "auto":
        raise ConfigError(f"dtype {requested!r} is not one of auto, {', '.join(DTYPES)}")
    on_cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
    if on_cuda and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def flash_attn_problem() -> str | None:
    """Why flash-attn cannot run here (None when it can): not installed, or installed but broken."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    if importlib.util.find_spec("flash_attn") is None:
        return "the flash-attn package is not installed (pip install flash-attn --no-build-isolation)"
    try:
        import flash_attn  # noqa: F401
        from flash_attn import flash_attn_func  # noqa: F401  (the compiled extension loads here)
    except Exception as e:  # a wheel built for another torch/CUDA fails here with an undefined symbol
        return f"flash-attn is installed but does not load ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
    return None


def choose_attention(requested: str, dtype: torch.dtype, device: str | None = None) -> tuple[str, str]:
    """The attention implementation to load a model with, and why (the run logs the reason).

    ``auto`` takes flash-attn on CUDA with fp16/bf16 when it is installed and loads, else sdpa. An
    explicit ``flash_attention_2`` that cannot run is a ``ConfigError`` naming the reason. A flash-attn
    that is installed but broken is an error under ``auto`` too: installing it means asking for it.
    """
    if requested not in ATTENTIONS:
        raise ConfigError(f"attention {requested!r} is not one of {', '.join(ATTENTIONS)}")
    on_cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
    half = dtype in (torch.float16, torch.bfloat16)
    if requested == FLASH:
        if not half:
            raise ConfigError(f"attention flash_attention_2 needs dtype bf16 or fp16, not {_name(dtype)}: "
                              "set the dtype to bf16, or the attention to sdpa")
        problem = flash_attn_problem() if on_cuda else "no CUDA device"
        if problem:
            raise ConfigError(f"attention flash_attention_2 was asked for but cannot run: {problem}")
        return FLASH, "asked for"
    if requested != "auto":
        return requested, "asked for"
    if not on_cuda:
        return "sdpa", "no CUDA device"
    installed = importlib.util.find_spec("flash_attn") is not None
    problem = flash_attn_problem()
    if installed and problem:
        raise ConfigError(f"{problem}; reinstall it for this torch (docs: GPU install) or set the attention to sdpa")
    if not half:
        return "sdpa", f"flash-attn needs bf16/fp16 and the dtype is {_name(dtype)}"
    if problem:
        return "sdpa", problem
    return FLASH, f"CUDA, {_name(dtype)}, flash-attn installed"


def _name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}.get(dtype, str(dtype))
