"""onegen/devices.py on CPU: CUDA, bf16 support and flash-attn (installed, missing, broken) are faked
with monkeypatch, so every row of docs/gpu.md's attention table is checked without a GPU."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types

import pytest
import torch

from onegen import devices
from onegen.devices import FLASH, choose_attention, choose_dtype, flash_attn_problem
from onegen.errors import ConfigError

_real_find_spec = importlib.util.find_spec


class _BrokenFlash(types.ModuleType):
    """What a flash-attn wheel built for another torch looks like: the package imports, its compiled
    extension does not."""

    def __getattr__(self, name: str):
        raise ImportError("/venv/lib/python3.11/site-packages/flash_attn_2_cuda.cpython-311-x86_64-linux-gnu.so: "
                          "undefined symbol: _ZN3c104cuda9SetDeviceEi")


def _cuda(monkeypatch, available: bool = True, bf16: bool = True) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)


def _flash(monkeypatch, state: str) -> None:
    """state: "missing", "ok" (imports, has flash_attn_func) or "broken" (its extension fails)."""
    def find_spec(name, *args, **kwargs):
        if name == "flash_attn":
            return None if state == "missing" else importlib.machinery.ModuleSpec("flash_attn", None)
        return _real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    if state == "missing":
        monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
        return
    if state == "ok":
        mod = types.ModuleType("flash_attn")
        mod.__version__ = "2.8.3"
        mod.flash_attn_func = lambda *a, **k: None
    else:
        mod = _BrokenFlash("flash_attn")
    monkeypatch.setitem(sys.modules, "flash_attn", mod)


def test_auto_on_cpu_is_sdpa_in_fp32(monkeypatch):
    _cuda(monkeypatch, available=False)
    _flash(monkeypatch, "ok")  # even installed: no CUDA, no flash
    assert devices.default_device() == "cpu"
    dtype = choose_dtype("auto")
    assert dtype == torch.float32
    assert choose_attention("auto", dtype) == ("sdpa", "no CUDA device")
    assert choose_attention("auto", torch.bfloat16) == ("sdpa", "no CUDA device")
    assert flash_attn_problem() == "no CUDA device"


def test_auto_on_cuda_bf16_with_flash_installed_is_flash(monkeypatch):
    _cuda(monkeypatch)
    _flash(monkeypatch, "ok")
    assert devices.default_device() == "cuda"
    dtype = choose_dtype("auto", "cuda")
    assert dtype == torch.bfloat16
    impl, why = choose_attention("auto", dtype, "cuda")
    assert impl == FLASH == "flash_attention_2" and "bf16" in why
    assert choose_attention("auto", torch.float16, None)[0] == FLASH
    assert flash_attn_problem() is None
    # The same process asked about a CPU device (evaluation with --device cpu): sdpa.
    assert choose_attention("auto", dtype, "cpu") == ("sdpa", "no CUDA device")
    assert choose_dtype("auto", "cpu") == torch.float32


def test_auto_on_cuda_fp32_is_sdpa_naming_the_dtype(monkeypatch):
    _cuda(monkeypatch)
    _flash(monkeypatch, "ok")
    impl, why = choose_attention("auto", torch.float32, "cuda")
    assert impl == "sdpa"
    assert "fp32" in why and "bf16" in why, why


def test_auto_on_cuda_without_flash_is_sdpa_with_the_reason(monkeypatch):
    _cuda(monkeypatch)
    _flash(monkeypatch, "missing")
    impl, why = choose_attention("auto", torch.bfloat16, "cuda")
    assert impl == "sdpa" and "not installed" in why and "--no-build-isolation" in why, why


def test_auto_on_a_gpu_without_bf16_is_fp32(monkeypatch):
    _cuda(monkeypatch, bf16=False)
    assert choose_dtype("auto", "cuda") == torch.float32
    assert choose_dtype("bf16", "cuda") == torch.bfloat16  # asked for: as asked


def test_explicit_flash_with_fp32_is_an_error(monkeypatch):
    _cuda(monkeypatch)
    _flash(monkeypatch, "ok")  # installed and loading: the dtype alone is the problem
    with pytest.raises(ConfigError, match=r"flash_attention_2 needs dtype bf16 or fp16, not fp32"):
        choose_attention("flash_attention_2", torch.float32, "cuda")


def test_explicit_flash_not_installed_is_an_error(monkeypatch):
    _cuda(monkeypatch)
    _flash(monkeypatch, "missing")
    with pytest.raises(ConfigError, match=r"asked for but cannot run: the flash-attn package is not installed"):
        choose_attention("flash_attention_2", torch.bfloat16, "cuda")


def test_explicit_flash_without_cuda_is_an_error(monkeypatch):
    _cuda(monkeypatch, available=False)
    _flash(monkeypatch, "ok")
    with pytest.raises(ConfigError, match="no CUDA device"):
        choose_attention("flash_attention_2", torch.bfloat16)


def test_explicit_flash_that_loads_is_taken(monkeypatch):
    _cuda(monkeypatch)
    _flash(monkeypatch, "ok")
    assert choose_attention("flash_attention_2", torch.bfloat16, "cuda") == (FLASH, "asked for")


def test_installed_but_broken_flash_is_an_error_under_auto(monkeypatch):
    _cuda(monkeypatch)
    _flash(monkeypatch, "broken")
    problem = flash_attn_problem()
    assert problem is not None and "installed but does not load" in problem and "undefined symbol" in problem
    with pytest.raises(ConfigError, match=r"installed but does not load \(ImportError: .*undefined symbol") as e:
        choose_attention("auto", torch.bfloat16, "cuda")
    assert "sdpa" in str(e.value)  # the message says how to get going again
    # Not even fp32 hides it: the broken install is reported before the dtype is looked at.
    with pytest.raises(ConfigError, match="does not load"):
        choose_attention("auto", torch.float32, "cuda")
    with pytest.raises(ConfigError, match="cannot run: flash-attn is installed but does not load"):
        choose_attention("flash_attention_2", torch.bfloat16, "cuda")


def test_sdpa_and_eager_are_taken_as_asked(monkeypatch):
    _cuda(monkeypatch)
    _flash(monkeypatch, "broken")  # a broken flash-attn does not matter when it is not asked for
    assert choose_attention("sdpa", torch.float32, "cuda") == ("sdpa", "asked for")
    assert choose_attention("eager", torch.bfloat16, "cuda") == ("eager", "asked for")


def test_unknown_names_are_errors():
    with pytest.raises(ConfigError, match="attention 'flash'"):
        choose_attention("flash", torch.bfloat16)
    with pytest.raises(ConfigError, match="dtype 'fp64'"):
        choose_dtype("fp64")
    assert choose_dtype("fp16") == torch.float16 and choose_dtype("fp32") == torch.float32
