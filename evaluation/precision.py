"""How a checkpoint runs in evaluation: device, dtype and attention kernel, resolved once per command.

The rules live in ``onegen.devices`` (shared with training); this module holds the resolved choice,
which the index manifest and the eval run's MLflow params record, and the index reuse check
compares (vectors computed in bf16 are not those of fp32). Importing it loads torch, not a model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from onegen.devices import DTYPES, choose_attention, choose_dtype, default_device

# What an index manifest written before dtype/attention were recorded was built with (fp32, HF default).
LEGACY = {"dtype": "fp32", "attn": "sdpa"}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``bf16`` (the CLI's names); other dtypes as torch spells them."""
    return {v: k for k, v in DTYPES.items()}.get(dtype, str(dtype))


@dataclass(frozen=True)
class Precision:
    """How the checkpoint runs: device, dtype and attention kernel (with the reason it was chosen)."""

    device: str
    dtype: torch.dtype
    attn: str
    attn_reason: str

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.dtype)

    def record(self) -> dict[str, str]:
        """What the index manifest and the MLflow params hold."""
        return {"dtype": self.dtype_name, "attn": self.attn, "attn_reason": self.attn_reason, "device": self.device}

    def describe(self) -> str:
        return f"{self.dtype_name}, attention {self.attn} ({self.attn_reason}), on {self.device}"


def resolve_precision(device: str | None = None, dtype: str | torch.dtype = "auto", attn: str = "auto") -> Precision:
    """``auto``: bf16 + flash-attn on CUDA (flash when installed, else sdpa), fp32 + sdpa on CPU.

    Cheap (no model is loaded): an impossible choice (flash_attention_2 with fp32, flash-attn asked
    for without CUDA) raises ``ConfigError`` here, before anything is loaded.
    """
    device = device or default_device()
    if isinstance(dtype, torch.dtype):
        dtype = dtype_name(dtype)
    chosen = choose_dtype(dtype, device)
    impl, why = choose_attention(attn, chosen, device)
    return Precision(str(device), chosen, impl, why)
