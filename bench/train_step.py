"""Training cost, measured with the real trainer (DeepSpeed ZeRO-3; CPU gloo here) as subprocesses.

Each configuration is one trainer run on the same prepared data and seed (so the same query batches);
s/step, tokens/s, padding and memory are read from its metrics.jsonl, skipping the first steps
(start-up effects). Memory on CPU: ``peak`` is the process's peak resident memory, ``step`` the peak
above the memory in use when the steps began (activations and gradients, mostly); on GPU, allocated
memory. Parts (``--part``, default all):

* ``cost``: git vs onegen, padded vs packed (data.packing), 2 ranks vs 1. Time per step and per
  encoded token (a onegen step also encodes each [RQ]'s positive and hard negatives), the ratio of
  tokens each encodes, padding fraction. Targets (#15): onegen's time per encoded token <= 1.05x git's;
  packed onegen's time per step <= padded onegen's.
* ``grad_cache``: step memory against the number of queries in the contrastive batch (the micro-batch
  here: one rank), with and without loss.grad_cache, and the cost in time per step.
* ``lora``: full fine-tuning vs model.lora on ``--lora-data`` (a world prepared with SmolLM2's
  tokenizer, model.source=smollm2): trainable parameters, s/step, memory.

    python bench/train_step.py --data runs/world/rag_train --part cost grad_cache
    python bench/train_step.py --part lora --lora-data runs/world-smollm2/rag_train
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from onegen.stages import ROOT, stage_env
from onegen.tiny_train import train_cmd

TINY_RECIPE = ["model.hidden_size=128", "model.intermediate_size=384", "model.num_layers=2", "model.num_heads=4"]
PACK = ("data.packing=true",)


def env() -> dict:
    """The stages' environment (offline defaults, no launcher variables), without a tracking URI left from elsewhere."""
    e = stage_env()
    e.pop("MLFLOW_TRACKING_URI", None)
    return e


def run(launcher: str, data: Path, out: Path, steps: int, mode: str, model: list[str], extra: tuple[str, ...] = ()) -> dict:
    cmd = train_cmd(launcher, data, out, f"optim.max_steps={steps}", f"loss.mode={mode}", "checkpoint_every=100000",
                    "export=false", *model, *extra)
    t0 = time.time()
    p = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{launcher} {mode} {' '.join(extra)} failed:\n{p.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steady = rows[max(2, len(rows) // 5):] or rows
    med = lambda k: statistics.median(r[k] for r in steady if k in r) if any(k in r for r in steady) else 0.0  # noqa: E731
    return {"launcher": launcher, "mode": mode, "extra": extra, "wall_s": time.time() - t0,
            "tokens_per_s": med("tokens_per_s"), "s_per_step": med("step_s"), "pad_frac": med("pad_frac"),
            "tokens_per_step": med("tokens_per_s") * med("step_s"),
            "peak_mem_mb": max(r.get("peak_mem_mb", 0) for r in rows),
            "step_mem_mb": max(r.get("step_mem_mb", 0) for r in rows), "log": p.stdout + p.stderr}


def _line(label: str, r: dict) -> str:
    return (f"{label:44s} s/step={r['s_per_step']:.3f}  tokens/step={r['tokens_per_step']:7.0f}  "
            f"us/token={1e6 / max(r['tokens_per_s'], 1e-9):7.1f}  pad={r['pad_frac']:.2f}  "
            f"peak={r['peak_mem_mb']:6.0f} MB  step={r['step_mem_mb']:6.0f} MB")


def part_cost(data: Path, tmp: Path, steps: int, model: list[str]) -> None:
    runs = {
        "git padded": ("python", "git", ()),
        "git packed": ("python", "git", PACK),
        "onegen padded": ("python", "onegen", ()),
        "onegen packed": ("python", "onegen", PACK),
        "onegen padded, in-batch negatives only": ("python", "onegen", ("loss.num_negatives=0",)),
        "onegen padded, 2 ranks": ("torchrun", "onegen", ()),
    }
    res = {}
    for label, (launcher, mode, extra) in runs.items():
        res[label] = run(launcher, data, tmp / f"cost-{len(res)}", steps, mode, model, extra)
        print(_line(label, res[label]), flush=True)
    us = {k: 1 / r["tokens_per_s"] for k, r in res.items()}
    print("\n# cost: ratios (same query batches; per token = per real token encoded)")
    for pad in ("padded", "packed"):
        git, one = res[f"git {pad}"], res[f"onegen {pad}"]
        print(f"{pad:7s} onegen/git  time per step {one['s_per_step'] / git['s_per_step']:.2f}x  "
              f"time per encoded token {us[f'onegen {pad}'] / us[f'git {pad}']:.2f}x (target <= 1.05x)  "
              f"tokens encoded {one['tokens_per_step'] / git['tokens_per_step']:.2f}x")
    for mode in ("git", "onegen"):
        pk, pd = res[f"{mode} packed"], res[f"{mode} padded"]
        print(f"{mode:6s} packed/padded  time per step {pk['s_per_step'] / pd['s_per_step']:.2f}x (target <= 1.00x for onegen)  "
              f"tokens/s {pk['tokens_per_s'] / pd['tokens_per_s']:.2f}x  padding {pd['pad_frac']:.2f} -> {pk['pad_frac']:.2f}  "
              f"step memory {pk['step_mem_mb'] / max(pd['step_mem_mb'], 1e-9):.2f}x")
    two, one = res["onegen padded, 2 ranks"], res["onegen padded"]
    print(f"2 ranks vs 1 rank, tokens/s: {two['tokens_per_s'] / one['tokens_per_s']:.2f}x")


def part_grad_cache(data: Path, tmp: Path, steps: int, model: list[str], sizes: list[int], chunk: int) -> None:
    print(f"\n# grad_cache: memory against the contrastive batch (queries per micro-batch, 1 rank; chunk {chunk} rows)")
    for n in sizes:
        common = (f"optim.micro_batch_size={n}", "loss.ret_loss=infonce")
        plain = run("python", data, tmp / f"gc-{n}-0", steps, "onegen", model, common)
        cached = run("python", data, tmp / f"gc-{n}-1", steps, "onegen", model,
                     common + ("loss.grad_cache=true", f"loss.grad_cache_chunk={chunk}"))
        print(f"queries={n:3d}  step memory {plain['step_mem_mb']:6.0f} MB -> cached {cached['step_mem_mb']:6.0f} MB "
              f"({cached['step_mem_mb'] / max(plain['step_mem_mb'], 1e-9):.2f}x)  peak {plain['peak_mem_mb']:6.0f} -> "
              f"{cached['peak_mem_mb']:6.0f} MB  s/step {plain['s_per_step']:.3f} -> {cached['s_per_step']:.3f} "
              f"({cached['s_per_step'] / plain['s_per_step']:.2f}x)", flush=True)


def _trainable(log: str) -> str:
    found = [line for line in log.splitlines() if "trainable" in line.lower()]
    return found[-1].strip() if found else "(the trainer printed no trainable-parameter line)"


def part_lora(data: Path, tmp: Path, steps: int) -> None:
    print(f"\n# lora: SmolLM2-135M on {data}, 1 rank ZeRO-3, full fine-tuning vs LoRA")
    smol = ["model.source=smollm2", "model.dtype=fp32", "optim.micro_batch_size=4", "optim.lr=1e-4"]
    res = {}
    for label, extra in (("full", ()), ("lora", ("model.lora.enabled=true",))):
        res[label] = run("python", data, tmp / f"lora-{label}", steps, "onegen", smol, extra)
        print(_line(label, res[label]) + "\n    " + _trainable(res[label]["log"]), flush=True)
    full, lora = res["full"], res["lora"]
    print(f"lora/full  s/step {lora['s_per_step'] / full['s_per_step']:.2f}x  peak memory "
          f"{lora['peak_mem_mb'] / full['peak_mem_mb']:.2f}x  step memory {lora['step_mem_mb'] / max(full['step_mem_mb'], 1e-9):.2f}x")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
    ap.add_argument("--part", nargs="+", choices=["cost", "grad_cache", "lora"], default=["cost", "grad_cache", "lora"])
    ap.add_argument("--data", help="a prepared RAG dataset dir (e.g. runs/world/rag_train), for cost and grad_cache")
    ap.add_argument("--lora-data", help="a RAG dataset prepared with SmolLM2's tokenizer, for lora")
    ap.add_argument("--steps", type=int, default=12, help="steps per run (the first fifth, at least 2, are skipped)")
    ap.add_argument("--lora-steps", type=int, default=6)
    ap.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32, 64], help="grad_cache: queries per micro-batch")
    ap.add_argument("--chunk", type=int, default=4, help="grad_cache: rows per re-run chunk")
    ap.add_argument("--model", nargs="*", default=TINY_RECIPE, help="trainer overrides for the model size (cost, grad_cache)")
    ns = ap.parse_args()
    if ({"cost", "grad_cache"} & set(ns.part)) and not ns.data:
        ap.error("--data is needed for the cost and grad_cache parts")
    if "lora" in ns.part and not ns.lora_data:
        ap.error("--lora-data is needed for the lora part")
    with tempfile.TemporaryDirectory() as tmp:
        if "cost" in ns.part:
            part_cost(Path(ns.data).resolve(), Path(tmp), ns.steps, ns.model)
        if "grad_cache" in ns.part:
            part_grad_cache(Path(ns.data).resolve(), Path(tmp), ns.steps, ns.model, ns.sizes, ns.chunk)
        if "lora" in ns.part:
            part_lora(Path(ns.lora_data).resolve(), Path(tmp), ns.lora_steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
