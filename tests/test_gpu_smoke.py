"""bench/gpu_smoke.sh and its helper on CPU: the scripts parse and pass shellcheck, the parameter count of
the Qwen2-1.5B shape is transformers' own (1.54B), the MFU arithmetic and the report of a finished run.
(The smoke run itself needs a GPU; see docs/gpu.md.)"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT

SMOKE = ROOT / "bench" / "gpu_smoke.sh"
INSTALL = ROOT / "scripts" / "install_gpu.sh"
QWEN2_1_5B = {"source": "tiny", "architecture": "qwen2", "hidden_size": 1536, "intermediate_size": 8960, "num_layers": 28,
              "num_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True}


def _helper():
    spec = importlib.util.spec_from_file_location("gpu_smoke", ROOT / "bench" / "gpu_smoke.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gpu_smoke", mod)
    spec.loader.exec_module(mod)
    return mod


smoke = _helper()


@pytest.mark.parametrize("script", [SMOKE, INSTALL], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_scripts_parse_and_pass_shellcheck(script):
    p = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install -y shellcheck; .ci/run installs it)")
    p = subprocess.run(["shellcheck", "-x", "--format=gcc", str(script.relative_to(ROOT))], cwd=ROOT, capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def test_smoke_script_runs_the_documented_steps():
    text = SMOKE.read_text()
    assert "set -uo pipefail" in text and "PYTHONUNBUFFERED=1" in text and "scripts/env.sh" in text
    assert "-m pytest -m gpu tests/test_gpu.py" in text
    for override in ("model.architecture=qwen2", "model.hidden_size=1536", "model.intermediate_size=8960",
                     "model.num_layers=28", "model.num_heads=12", "model.num_key_value_heads=2", "model.vocab_size=151936",
                     "model.dtype=bf16", "model.tie_word_embeddings=true", "model.gradient_checkpointing=true",
                     "optim.warmup_steps=0", "export=false", "data.eval=[]"):
        assert override in text, override
    assert "data.packing=true" in text and "model.lora.enabled=true" in text and "loss.grad_cache=true" in text
    assert 'say "PASS' in text and 'say "FAIL' in text  # the last line a person reads
    assert "from tests" not in (ROOT / "bench" / "gpu_smoke.py").read_text()  # a bench never imports tests


def test_qwen2_1_5b_parameter_count():
    shape = smoke.shape_from_model_config(QWEN2_1_5B)
    counts = smoke.param_counts(shape)
    assert counts["total"] == pytest.approx(1.54e9, rel=0.01)  # Qwen2-1.5B: 1.54B with tied embeddings
    assert counts["embedding"] == 151936 * 1536 and counts["non_embedding"] == pytest.approx(1.31e9, rel=0.01)
    # Tied: one stored matrix, but the LM head's matmul still costs FLOPs, so N (for the MFU) includes it.
    assert counts["flops_params"] == counts["non_embedding"] + counts["lm_head"] == counts["total"]
    untied = smoke.param_counts(smoke.shape_from_model_config({**QWEN2_1_5B, "tie_word_embeddings": False}))
    assert untied["total"] == counts["total"] + 151936 * 1536 and untied["flops_params"] == counts["flops_params"]


@pytest.mark.parametrize("arch", ["qwen2", "llama", "mistral"])
def test_parameter_count_equals_transformers(arch):
    """The formula against the real module tree (built on the meta device: no memory, no time)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    model_cfg = {**QWEN2_1_5B, "architecture": arch}
    if arch != "qwen2":  # a smaller shape, untied, other head counts
        model_cfg.update(hidden_size=256, intermediate_size=704, num_layers=3, num_heads=8, num_key_value_heads=4,
                         vocab_size=1000, tie_word_embeddings=False)
    cls = {"qwen2": Qwen2Config, "llama": LlamaConfig, "mistral": MistralConfig}[arch]
    hf = cls(vocab_size=model_cfg["vocab_size"], hidden_size=model_cfg["hidden_size"],
             intermediate_size=model_cfg["intermediate_size"], num_hidden_layers=model_cfg["num_layers"],
             num_attention_heads=model_cfg["num_heads"], num_key_value_heads=model_cfg["num_key_value_heads"],
             tie_word_embeddings=model_cfg["tie_word_embeddings"])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf)
    real = sum(p.numel() for p in model.parameters())  # tied weights are one Parameter: counted once
    assert smoke.param_counts(smoke.shape_from_model_config(model_cfg))["total"] == real
    assert smoke.param_counts(smoke.shape_from_hf_config(hf.to_dict()))["total"] == real


def test_mfu_arithmetic():
    shape = smoke.shape_from_model_config(QWEN2_1_5B)
    n = smoke.param_counts(shape)["flops_params"]
    assert smoke.flops_per_token(shape) == 6 * n
    assert smoke.peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert smoke.peak_bf16_flops("NVIDIA H200") == 989e12
    assert smoke.peak_bf16_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert smoke.peak_bf16_flops("NVIDIA L40S") == 362e12
    assert smoke.peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert smoke.peak_bf16_flops("Tesla T4") is None and smoke.peak_bf16_flops(None) is None
    # 50k tokens/s on one H100: 6 x 1.544e9 x 5e4 / 989e12 = 46.8%
    assert smoke.mfu(50_000, shape, "NVIDIA H100 80GB HBM3") == pytest.approx(6 * n * 5e4 / 989e12)
    assert smoke.mfu(50_000, shape, "NVIDIA H100 80GB HBM3") == pytest.approx(0.468, abs=0.001)
    assert smoke.mfu(100_000, shape, "NVIDIA A100-SXM4-80GB", gpus=8) == pytest.approx(6 * n * 1e5 / (8 * 312e12))
    assert smoke.mfu(50_000, shape, "Tesla T4") is None


def test_report_of_a_finished_run(tmp_path, capsys):
    """What step 5 prints, from a run's config.yaml and metrics.jsonl (the first 2 steps are warm-up)."""
    out = tmp_path / "train"
    out.mkdir()
    (out / "config.yaml").write_text(yaml.safe_dump({"model": {**QWEN2_1_5B, "dtype": "bf16"},
                                                     "optim": {"micro_batch_size": 8}}))
    rows = [{"step": i, "loss": 12.0 - i, "tokens_per_s": tps, "step_s": dt, "peak_mem_mb": 30000.0 + i}
            for i, (tps, dt) in enumerate([(100.0, 30.0), (1000.0, 3.0), (4000.0, 1.0), (2000.0, 2.0)], start=1)]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    log = tmp_path / "train.log"
    log.write_text("[train] onegen · tiny · 1 rank(s) · ZeRO-3 · flash_attention_2 (CUDA, bf16, flash-attn installed) · "
                   "160 rows · 4 steps\n")
    assert smoke.main(["report", "--out", str(out), "--log", str(log), "--gpu-name", "NVIDIA H100 80GB HBM3",
                       "--require-flash"]) == 0
    text = capsys.readouterr().out
    facts = json.loads(text.split("[smoke] json ", 1)[1].splitlines()[0])
    assert facts["timed_steps"] == 2 and facts["tokens_per_s"] == pytest.approx(8000 / 3)  # (4000 + 4000) / (1 + 2)
    assert facts["step_s_mean"] == pytest.approx(1.5) and facts["peak_mem_mb"] == 30004.0
    assert facts["attention"] == "flash_attention_2"
    assert facts["mfu"] == pytest.approx(6 * facts["params"]["flops_params"] * (8000 / 3) / 989e12)
    assert "MFU " in text and "tokens/s 2667" in text
    # Unknown GPU: said so, not an error; a run without flash-attn fails only when flash was required.
    log.write_text(log.read_text().replace("flash_attention_2 (CUDA, bf16, flash-attn installed)", "sdpa (...)"))
    assert smoke.main(["report", "--out", str(out), "--log", str(log), "--gpu-name", "Tesla T4"]) == 0
    assert "unknown peak" in capsys.readouterr().out
    assert smoke.main(["report", "--out", str(out), "--log", str(log), "--gpu-name", "Tesla T4", "--require-flash"]) == 1
    assert smoke.main(["report", "--out", str(out), "--skip", "4"]) == 2  # nothing left to time
    assert "nothing left after skipping 4" in capsys.readouterr().err


def test_compare_of_a_packed_run_with_a_padded_one(tmp_path, capsys):
    """Step 6's line: the packed run's ratios to the padded one (after the warm-up steps)."""
    for name, tps, pad in (("padded", 1000.0, 0.4), ("packed", 1500.0, 0.0)):
        (tmp_path / name).mkdir()
        rows = [{"step": i, "loss": 1.0, "tokens_per_s": tps, "step_s": 2.0, "peak_mem_mb": 100.0 * (2 if name == "padded" else 1),
                 "pad_frac": pad} for i in range(1, 5)]
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert smoke.main(["compare", "--base", str(tmp_path / "padded"), "--other", str(tmp_path / "packed"),
                       "--label", "packed"]) == 0
    text = capsys.readouterr().out
    facts = json.loads(text.split("[smoke] json ", 1)[1].splitlines()[0])
    assert facts["ratios"]["tokens_per_s"] == pytest.approx(1.5) and facts["ratios"]["peak_mem_mb"] == pytest.approx(0.5)
    assert facts["pad_frac"] == [0.4, 0.0] and "packed vs base: tokens/s 1.50x" in text


def test_params_command_reads_the_recipe_and_overrides(capsys):
    args = ["params", "--config", str(ROOT / "configs" / "tiny-cpu.yaml"), "model.architecture=qwen2",
            "model.hidden_size=1536", "model.intermediate_size=8960", "model.num_layers=28", "model.num_heads=12",
            "model.num_key_value_heads=2", "model.vocab_size=151936", "model.tie_word_embeddings=true"]
    assert smoke.main(args) == 0
    assert json.loads(capsys.readouterr().out)["total"] == smoke.param_counts(smoke.shape_from_model_config(QWEN2_1_5B))["total"]


def test_stack_runs_on_cpu_and_requires_cuda_on_request():
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_smoke.py"), "stack"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    for what in ("python", "torch", "flash-attn", "faiss", "deepspeed", "transformers"):
        assert f"[stack] {what}" in p.stdout, p.stdout
    import torch

    if not torch.cuda.is_available():
        p = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_smoke.py"), "stack", "--require-cuda"], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 1 and "CUDA is not available" in p.stderr
