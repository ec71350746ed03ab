"""Does LoRA learn to retrieve as well as full fine-tuning, in the same step budget? Both curves, one run.

1. A base LM: the tiny-cpu recipe's Llama trained as a plain LM (loss.mode=git) on the world's
   training rows, exported (a stand-in for a pretrained model: CPU-sized; ``--base DIR`` uses yours,
   e.g. SmolLM2's HF dir with a world prepared with its tokenizer).
2. From that base, OneGen fine-tuning twice with the same data, seed and step budget: every weight
   (full), and LoRA adapters plus the special tokens' rows (model.lora.enabled=true).
3. Held-out teacher-forced retrieval accuracy (the trainer's periodic evaluation on ``rag_dev``) every
   ``--eval-every`` steps, printed as a table and drawn into ``--out``/lora_curves.png.

    python bench/lora_curves.py --world runs/world --out runs/lora-curves
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from onegen.stages import ROOT, stage_env
from onegen.tiny_train import train_cmd

TINY_RECIPE = ["model.hidden_size=128", "model.intermediate_size=384", "model.num_layers=2", "model.num_heads=4"]
ACC = "eval/retrieval_acc"


def _train(world: Path, out: Path, *overrides: str) -> Path:
    if (out / "summary.json").exists():  # a finished run is reused: rerun with a new --out to redo it
        return out
    cmd = train_cmd("python", world / "rag_train", out, *TINY_RECIPE, "checkpoint_every=0", *overrides)
    print("$", " ".join(cmd[1:]), flush=True)
    p = subprocess.run(cmd, cwd=ROOT, env=stage_env(), capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"training failed:\n{p.stderr[-4000:]}")
    print("  " + "\n  ".join(line for line in p.stdout.splitlines() if "trainable" in line.lower() or "done" in line), flush=True)
    return out


def _curve(out: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r[ACC]) for r in rows if ACC in r]


def _plot(curves: dict[str, list[tuple[int, float]]], path: Path) -> None:
    # heavy (matplotlib): only when drawing
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: E402 (after the backend is chosen)

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, pts in curves.items():
        ax.plot([s for s, _ in pts], [a for _, a in pts], marker="o", label=label)
    ax.axhline(0.9, color="grey", linestyle="--", linewidth=1, label="0.9")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("held-out teacher-forced retrieval acc")
    ax.set_ylim(0, 1.02)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
    ap.add_argument("--world", required=True, help="a prepared world (rag_train, rag_dev), e.g. runs/world")
    ap.add_argument("--out", required=True, help="where the runs, the table and the plot go")
    ap.add_argument("--base", help="an HF model dir to fine-tune (default: pretrain the tiny base first)")
    ap.add_argument("--base-steps", type=int, default=300, help="steps of the plain-LM base training")
    ap.add_argument("--steps", type=int, default=400, help="the fine-tuning step budget (both runs)")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--full-lr", type=float, default=3e-3)
    ap.add_argument("--lora-lr", type=float, default=1e-2)
    ap.add_argument("--lora", nargs="*", default=["model.lora.r=32"],
                    help="extra overrides of the LoRA run (default model.lora.r=32: rank 16 reached 0.88 in 400 steps)")
    ns = ap.parse_args()
    world, out = Path(ns.world).resolve(), Path(ns.out).resolve()
    base = Path(ns.base).resolve() if ns.base else _train(world, out / "base", "loss.mode=git",
                                                           f"optim.max_steps={ns.base_steps}") / "model"
    common = (f"model.source={base}", "loss.mode=onegen", f"optim.max_steps={ns.steps}", f"eval_every={ns.eval_every}",
              f"data.eval=[{world / 'rag_dev'}]", "optim.warmup_steps=10")
    runs = {"full fine-tuning": _train(world, out / "full", *common, f"optim.lr={ns.full_lr}"),
            "LoRA": _train(world, out / "lora", *common, f"optim.lr={ns.lora_lr}", "model.lora.enabled=true", *ns.lora)}
    curves = {label: _curve(path) for label, path in runs.items()}
    steps = sorted({s for pts in curves.values() for s, _ in pts})
    print("\nstep  " + "  ".join(f"{label:>16s}" for label in curves))
    for s in steps:
        print(f"{s:4d}  " + "  ".join(f"{dict(pts).get(s, float('nan')):16.3f}" for pts in curves.values()))
    for label, pts in curves.items():
        first = next((s for s, a in pts if a >= 0.9), None)
        print(f"{label}: final {pts[-1][1]:.3f}; first step at >= 0.9: {first if first is not None else 'never'}")
    _plot(curves, out / "lora_curves.png")
    (out / "lora_curves.json").write_text(json.dumps(curves, indent=2))
    print(f"plot: {out / 'lora_curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
