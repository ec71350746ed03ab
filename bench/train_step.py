"""Training cost of OneGen vs generation-only (git) on the same prepared batches, and 2 vs 1 ranks.

Runs the real trainer (DeepSpeed ZeRO-3, CPU gloo here) as subprocesses on one prepared dataset:
  1 rank git · 1 rank onegen · 1 rank onegen without hard negatives · 2 ranks onegen
  (same seed → the same query batches for the 1-rank runs)
and reads seconds/step, tokens/s and peak memory from each run's metrics.jsonl (the first steps,
which include start-up effects, are skipped). Prints the ratios last. The onegen/git ratio is set by
the document tokens a step encodes besides its queries: on the synthetic world, with the recipe's 1
hard negative per [RQ], they equal the query tokens (1.16x with padding); with in-batch (and
cross-rank) negatives only, about half.

    python bench/train_step.py --data runs/world/rag_train --steps 30
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
        raise SystemExit(f"{launcher} {mode} failed:\n{p.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steady = rows[max(2, len(rows) // 5):]
    return {"launcher": launcher, "mode": mode, "steps": steps, "wall_s": time.time() - t0,
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
            "s_per_step": statistics.median(r["step_s"] for r in steady),
            "peak_mem_mb": max(r.get("peak_mem_mb", 0) for r in rows)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
    ap.add_argument("--data", required=True, help="a prepared RAG dataset dir (e.g. runs/world/rag_train)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--model", nargs="*", default=["model.hidden_size=128", "model.intermediate_size=384", "model.num_layers=2", "model.num_heads=4"],
                    help="trainer overrides for the model size")
    ns = ap.parse_args()
    data = Path(ns.data).resolve()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = (("python", "git", ()), ("python", "onegen", ()), ("python", "onegen", ("loss.num_negatives=0",)),
                ("torchrun", "onegen", ()))
        for launcher, mode, extra in runs:
            r = run(launcher, data, Path(tmp) / f"{launcher}-{mode}-{len(results)}", ns.steps, mode, ns.model, extra)
            results.append(r)
            label = mode + (" (in-batch negatives only)" if extra else "")
            print(f"{launcher:9s} {label:34s} ranks={'2' if launcher == 'torchrun' else '1'}  s/step={r['s_per_step']:.3f}  "
                  f"tokens/s={r['tokens_per_s']:8.0f}  "
                  f"peak memory={r['peak_mem_mb']:7.0f} MB  wall={r['wall_s']:.0f} s", flush=True)
    git, one, inbatch, two = results
    # Both 1-rank runs train on the same query rows; onegen also encodes the documents they need.
    print(f"\nonegen vs git, time per step (same query batches): {one['s_per_step'] / git['s_per_step']:.2f}x")
    print(f"onegen with in-batch negatives only vs git, time per step: {inbatch['s_per_step'] / git['s_per_step']:.2f}x")
    print(f"onegen vs git, peak memory: {one['peak_mem_mb'] / git['peak_mem_mb']:.2f}x")
    print(f"2 ranks vs 1 rank, tokens/s: {two['tokens_per_s'] / one['tokens_per_s']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
