"""Helpers of bench/gpu_smoke.sh: print the GPU stack, count a model's parameters, report a training
run's throughput and model FLOPs utilisation (MFU).

    python bench/gpu_smoke.py stack [--require-cuda] [--require-flash]
    python bench/gpu_smoke.py params --config configs/tiny-cpu.yaml model.architecture=qwen2 ...
    python bench/gpu_smoke.py report --out runs/smoke/train [--skip 2] [--gpus 1] [--gpu-name "NVIDIA H100"]
    python bench/gpu_smoke.py compare --base runs/smoke/train --other runs/smoke/train-packed --label packed

MFU = 6 x N x tokens/s / (GPUs x peak bf16 dense FLOP/s), N = non-embedding parameters + the LM head
(its matmul costs FLOPs even when its weights are tied to the embedding; the embedding lookup does
not). The 6 is forward (2) + backward (4) per parameter and token; attention's own score/value
FLOPs and the recomputation of gradient checkpointing are not counted (the usual convention), and
the trainer applies the LM head to GEN positions only, so this slightly overstates the work done.
Tokens are the trainer's count: real (non-pad) query and document tokens of a step (metrics.jsonl).

Everything here runs on CPU too (``params``, ``report`` on a finished run, ``stack`` without
``--require-cuda``); the arithmetic is in plain functions so tests check it without a GPU.

torch, faiss and the project's own modules are imported inside the functions that use them (``# lazy``):
``stack`` must report a missing or broken one rather than fail to start, and ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import shutil
import statistics
import subprocess
import sys
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import yaml

# Dense (no sparsity) bf16 tensor-core peak per GPU, FLOP/s, from the vendors' data sheets. The first
# entry whose key is in the device name (upper case) wins, so the specific names come first.
PEAK_BF16 = (
    ("H100 PCIE", 756e12),
    ("H100 NVL", 835e12),
    ("H200 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),  # SXM (and GH200)
    ("A100", 312e12),
    ("L40S", 362e12),
)


@dataclass(frozen=True)
class Shape:
    """What the parameter count of a Llama/Qwen2/Mistral decoder depends on."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    qkv_bias: bool  # Qwen2 has biases on q/k/v; Llama and Mistral have none

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def shape_from_model_config(model: dict) -> Shape:
    """The shape of a model built from a config (``model.source: tiny``), from the ``model`` section of a
    resolved training config (``OUTPUT/config.yaml``) or of a recipe with its overrides applied."""
    if model.get("source", "tiny") != "tiny":
        src = Path(str(model["source"]))
        if (src / "config.json").is_file():
            return shape_from_hf_config(json.loads((src / "config.json").read_text()))
        raise ValueError(f"model.source {model['source']!r}: the shape is known for tiny models and local HF dirs only")
    vocab = int(model.get("vocab_size") or 0)
    if vocab <= 0:
        raise ValueError("model.vocab_size is 0 (the tokenizer's length): set it to count the embedding")
    heads = int(model["num_heads"])
    return Shape(hidden=int(model["hidden_size"]), intermediate=int(model["intermediate_size"]),
                 layers=int(model["num_layers"]), heads=heads, kv_heads=int(model.get("num_key_value_heads") or 0) or heads,
                 vocab=vocab, tied=bool(model.get("tie_word_embeddings", False)),
                 qkv_bias=model.get("architecture", "llama") == "qwen2")


def shape_from_hf_config(cfg: dict) -> Shape:
    """The shape from a transformers ``config.json`` (llama, qwen2, mistral)."""
    heads = int(cfg["num_attention_heads"])
    return Shape(hidden=int(cfg["hidden_size"]), intermediate=int(cfg["intermediate_size"]),
                 layers=int(cfg["num_hidden_layers"]), heads=heads, kv_heads=int(cfg.get("num_key_value_heads") or heads),
                 vocab=int(cfg["vocab_size"]), tied=bool(cfg.get("tie_word_embeddings", False)),
                 qkv_bias=cfg.get("model_type") == "qwen2" or bool(cfg.get("attention_bias", False)))


def param_counts(s: Shape) -> dict[str, int]:
    """Parameters by part. ``total`` counts a tied LM head once; ``flops_params`` (N of the MFU) is the
    non-embedding parameters plus the LM head's matrix, tied or not."""
    kv = s.kv_heads * s.head_dim
    attn = s.hidden * s.hidden * 2 + s.hidden * kv * 2  # q, o; k, v
    if s.qkv_bias:
        attn += s.hidden + 2 * kv
    mlp = 3 * s.hidden * s.intermediate  # gate, up, down
    per_layer = attn + mlp + 2 * s.hidden  # two RMSNorm weights
    non_embedding = s.layers * per_layer + s.hidden  # + the final norm
    embedding = s.vocab * s.hidden
    lm_head = s.vocab * s.hidden
    return {"embedding": embedding, "lm_head": lm_head, "per_layer": per_layer, "non_embedding": non_embedding,
            "total": embedding + non_embedding + (0 if s.tied else lm_head),
            "flops_params": non_embedding + lm_head}


def flops_per_token(s: Shape) -> float:
    """Training FLOPs per token: 6 x (non-embedding parameters + LM head)."""
    return 6.0 * param_counts(s)["flops_params"]


def peak_bf16_flops(gpu_name: str | None) -> float | None:
    """The GPU's dense bf16 peak FLOP/s, or None for a GPU not in the table."""
    name = (gpu_name or "").upper()
    for key, peak in PEAK_BF16:
        if key in name:
            return peak
    return None


def mfu(tokens_per_s: float, s: Shape, gpu_name: str | None, gpus: int = 1) -> float | None:
    """Model FLOPs utilisation of ``gpus`` GPUs named ``gpu_name`` (None when the peak is unknown)."""
    peak = peak_bf16_flops(gpu_name)
    if peak is None:
        return None
    return flops_per_token(s) * tokens_per_s / (peak * gpus)


# ---- report: a training run's metrics ------------------------------------------------------------

def read_steps(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if "tokens_per_s" in r and "step_s" in r]


def summarize(rows: list[dict], skip: int = 2) -> dict:
    """Throughput over the steps after ``skip`` warm-up steps (first steps: allocator, JIT, cuDNN)."""
    timed = rows[skip:]
    if not timed:
        raise ValueError(f"{len(rows)} step(s) logged: nothing left after skipping {skip} warm-up step(s)")
    seconds = sum(float(r["step_s"]) for r in timed)
    tokens = sum(float(r["tokens_per_s"]) * float(r["step_s"]) for r in timed)
    losses = [float(r["loss"]) for r in rows if "loss" in r]
    return {"steps": len(rows), "timed_steps": len(timed), "tokens_per_s": tokens / seconds,
            "step_s_mean": seconds / len(timed), "step_s_median": statistics.median(float(r["step_s"]) for r in timed),
            "tokens_per_step": tokens / len(timed),
            "peak_mem_mb": max((float(r["peak_mem_mb"]) for r in rows if "peak_mem_mb" in r), default=float("nan")),
            "first_loss": losses[0] if losses else float("nan"), "last_loss": losses[-1] if losses else float("nan")}


def attention_of(log_text: str) -> str | None:
    """The attention the trainer reported in its start line ("[train] ... ZeRO-3 · flash_attention_2 (...)")."""
    for line in log_text.splitlines():
        if line.startswith("[train]") and "rank(s)" in line:
            m = re.search(r"\b(flash_attention_2|sdpa|eager)\b", line)
            if m:
                return m.group(1)
    return None


def _count(n: float) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def _gpu_name() -> str | None:
    try:
        # lazy: see module docstring
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:
        return None


def cmd_report(ns: argparse.Namespace) -> int:
    out = Path(ns.out)
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    shape = shape_from_model_config(cfg["model"])
    counts = param_counts(shape)
    s = summarize(read_steps(out), ns.skip)
    gpu = ns.gpu_name or _gpu_name()
    util = mfu(s["tokens_per_s"], shape, gpu, ns.gpus)
    attn = attention_of(Path(ns.log).read_text(errors="replace")) if ns.log and Path(ns.log).is_file() else None
    print(f"[smoke] model: {cfg['model'].get('architecture')} hidden {shape.hidden} x {shape.layers} layers, "
          f"{shape.heads} heads / {shape.kv_heads} kv, vocab {shape.vocab}: {_count(counts['total'])} parameters "
          f"({_count(counts['non_embedding'])} non-embedding; N = {_count(counts['flops_params'])} with the LM head)")
    print(f"[smoke] attention: {attn or '?'} · dtype {cfg['model'].get('dtype')} · "
          f"micro-batch {cfg['optim']['micro_batch_size']} · {s['steps']} steps ({s['timed_steps']} timed after {ns.skip} warm-up)")
    print(f"[smoke] tokens/s {s['tokens_per_s']:.0f} · step {s['step_s_mean']:.3f} s (median {s['step_s_median']:.3f}) · "
          f"{s['tokens_per_step']:.0f} tokens/step · peak memory {s['peak_mem_mb'] / 1024:.2f} GiB")
    peak = peak_bf16_flops(gpu)
    if util is None:
        print(f"[smoke] MFU: unknown peak for GPU {gpu!r} (table: {', '.join(k for k, _ in PEAK_BF16)}); "
              f"model FLOP/s {flops_per_token(shape) * s['tokens_per_s'] / 1e12:.1f} T")
    else:
        print(f"[smoke] MFU {100 * util:.1f}% (6 x {_count(counts['flops_params'])} x {s['tokens_per_s']:.0f} tok/s "
              f"/ ({ns.gpus} x {peak / 1e12:.0f} TFLOP/s bf16 dense, {gpu}))")
    print(f"[smoke] loss {s['first_loss']:.4f} -> {s['last_loss']:.4f}")
    print("[smoke] json " + json.dumps({**s, "mfu": util, "gpu": gpu, "attention": attn, "params": counts}))
    if not all(math.isfinite(r) for r in (s["first_loss"], s["last_loss"], s["tokens_per_s"])):
        print("[smoke] error: a non-finite loss or throughput", file=sys.stderr)
        return 1
    if ns.require_flash and attn != "flash_attention_2":
        print(f"[smoke] error: the run used {attn!r}, not flash_attention_2", file=sys.stderr)
        return 1
    return 0


def compare(base: dict, other: dict) -> dict:
    """Ratios other / base of two runs' ``summarize``: throughput, step time, tokens per step, peak memory."""
    keys = ("tokens_per_s", "step_s_mean", "tokens_per_step", "peak_mem_mb")
    return {k: other[k] / base[k] if base[k] else float("nan") for k in keys}


def cmd_compare(ns: argparse.Namespace) -> int:
    base, other = (summarize(read_steps(Path(p)), ns.skip) for p in (ns.base, ns.other))
    r = compare(base, other)
    pad = [statistics.median(float(x["pad_frac"]) for x in read_steps(Path(p))[ns.skip:] if "pad_frac" in x)
           if any("pad_frac" in x for x in read_steps(Path(p))) else float("nan") for p in (ns.base, ns.other)]
    print(f"[smoke] {ns.label} vs base: tokens/s {r['tokens_per_s']:.2f}x · step time {r['step_s_mean']:.2f}x · "
          f"tokens/step {r['tokens_per_step']:.2f}x · peak memory {r['peak_mem_mb']:.2f}x · padding {pad[0]:.2f} -> {pad[1]:.2f}")
    print("[smoke] json " + json.dumps({"label": ns.label, "ratios": r, "pad_frac": pad}))
    return 0 if all(math.isfinite(v) for v in r.values()) else 1


def cmd_params(ns: argparse.Namespace) -> int:
    # lazy: see module docstring
    from onegen.config import load_config, to_dict
    from pipeline.config import TrainConfig  # lazy: as above

    cfg = load_config(TrainConfig, ns.config, ns.overrides)
    shape = shape_from_model_config(to_dict(cfg.model))
    counts = param_counts(shape)
    print(json.dumps({"shape": shape.__dict__, **counts, "flops_per_token": flops_per_token(shape)}, indent=2))
    return 0


# ---- stack ----------------------------------------------------------------------------------------

def _version(module: str) -> tuple[str | None, str | None]:
    """(version, None) or (None, why it does not import)."""
    try:
        mod = __import__(module)
        return str(getattr(mod, "__version__", "?")), None
    except Exception as e:  # a broken install raises anything from ImportError to OSError
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"


def stack_lines() -> tuple[list[str], dict]:
    """Human lines and facts about python, torch/CUDA, GPUs, flash-attn, faiss, DeepSpeed, transformers."""
    facts: dict = {"python": platform.python_version()}
    lines = [f"python       {sys.version.split()[0]} ({sys.executable})"]
    torch_v, why = _version("torch")
    facts["cuda"] = False
    if torch_v is None:
        lines.append(f"torch        not importable ({why})")
    else:
        # lazy: see module docstring
        import torch

        facts["cuda"] = torch.cuda.is_available()
        lines.append(f"torch        {torch_v} · built for CUDA {torch.version.cuda or '- (CPU build)'} · "
                     f"cuDNN {torch.backends.cudnn.version() if torch.cuda.is_available() else '-'} · "
                     f"CUDA available: {torch.cuda.is_available()}")
        for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
            p = torch.cuda.get_device_properties(i)
            peak = peak_bf16_flops(p.name)
            lines.append(f"gpu {i}        {p.name} · {p.total_memory / 2**30:.1f} GiB · compute {p.major}.{p.minor} · "
                         f"bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'} · "
                         f"peak bf16 {f'{peak / 1e12:.0f} TFLOP/s' if peak else 'unknown peak'}")
    nvcc = shutil.which("nvcc")
    nvcc_v = ""
    if nvcc:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
        m = re.search(r"release ([0-9.]+)", out)
        nvcc_v = m.group(1) if m else "?"
    lines.append(f"nvcc         {nvcc_v + ' (' + nvcc + ')' if nvcc else 'not on PATH (DeepSpeed cannot JIT-build fused Adam)'}")
    facts["flash"] = _flash_line(lines, facts["cuda"])
    faiss_v, why = _version("faiss")
    if faiss_v is None:
        lines.append(f"faiss        not importable ({why})")
    else:
        # lazy: see module docstring
        import faiss

        n = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
        lines.append(f"faiss        {faiss_v} · GPUs: {n}{'' if n else ' (faiss-cpu, or no GPU visible)'}")
    for mod in ("deepspeed", "transformers", "accelerate", "datasets"):
        v, why = _version(mod)
        lines.append(f"{mod:<12} {v if v else f'not importable ({why})'}")
    return lines, facts


def _flash_line(lines: list[str], cuda: bool) -> bool:
    """Append flash-attn's line; True when training would use it (attention auto, bf16)."""
    try:
        dist = version("flash-attn")
    except PackageNotFoundError:
        dist = None
    try:
        # lazy: see module docstring
        import torch

        from onegen.devices import choose_attention, flash_attn_problem  # lazy: as above
        from onegen.errors import ConfigError  # lazy: as above
    except Exception as e:
        lines.append(f"flash-attn   {dist or 'not installed'} (onegen not importable: {e})")
        return False
    problem = flash_attn_problem()
    try:
        impl, why = choose_attention("auto", torch.bfloat16, "cuda" if cuda else "cpu")
        auto = f"attention auto (bf16) -> {impl}: {why}"
    except ConfigError as e:
        impl, auto = None, f"attention auto -> ERROR: {e}"
    lines.append(f"flash-attn   {dist or 'not installed'} · {'loads' if problem is None else problem} · {auto}")
    return impl == "flash_attention_2"


def cmd_stack(ns: argparse.Namespace) -> int:
    lines, facts = stack_lines()
    for line in lines:
        print(f"[stack] {line}")
    bad = []
    if ns.require_cuda and not facts["cuda"]:
        bad.append("CUDA is not available to torch (a CPU build of torch, no driver, or no GPU visible)")
    if ns.require_flash and not facts["flash"]:
        bad.append("flash-attn is not usable (see its line above; reinstall: pip install flash-attn --no-build-isolation)")
    for b in bad:
        print(f"[stack] error: {b}", file=sys.stderr)
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/gpu_smoke.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("stack", help="print python, torch/CUDA, GPUs, flash-attn, faiss, DeepSpeed, transformers",
                       allow_abbrev=False)
    p.add_argument("--require-cuda", action="store_true", help="exit 1 when torch sees no CUDA device")
    p.add_argument("--require-flash", action="store_true", help="exit 1 when flash-attn would not be used")
    p.set_defaults(fn=cmd_stack)
    p = sub.add_parser("params", help="parameter counts and FLOPs/token of a recipe's model (key=value overrides)",
                       allow_abbrev=False)
    p.add_argument("--config", required=True, help="YAML recipe (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, as for pipeline/train.py")
    p.set_defaults(fn=cmd_params)
    p = sub.add_parser("report", help="tokens/s, step time, peak memory and MFU of a finished training run",
                       allow_abbrev=False)
    p.add_argument("--out", required=True, help="the run's output_dir (config.yaml + metrics.jsonl)")
    p.add_argument("--skip", type=int, default=2, help="warm-up steps left out of the timing (default 2)")
    p.add_argument("--gpus", type=int, default=1, help="GPUs the run used (MFU is per GPU)")
    p.add_argument("--gpu-name", default=None, help="the GPU's name for the peak table (default: GPU 0 here)")
    p.add_argument("--log", default=None, help="the run's stdout, to show which attention it used")
    p.add_argument("--require-flash", action="store_true", help="exit 1 unless the run used flash_attention_2")
    p.set_defaults(fn=cmd_report)
    p = sub.add_parser("compare", help="one run against another: tokens/s, step time, memory, padding (ratios)",
                       allow_abbrev=False)
    p.add_argument("--base", required=True, help="the reference run's output_dir")
    p.add_argument("--other", required=True, help="the run compared with it")
    p.add_argument("--label", default="other", help="what the other run changes (printed)")
    p.add_argument("--skip", type=int, default=2, help="warm-up steps left out of the timing (default 2)")
    p.set_defaults(fn=cmd_compare)
    ns = parser.parse_args(argv)
    try:
        return ns.fn(ns)
    except (OSError, ValueError, KeyError) as e:
        print(f"[smoke] error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
