"""The main job: synthetic world → prep → train OneGen and the git baseline (DeepSpeed ZeRO-3, 2 CPU
ranks) → evaluate OneGen, two-pass, pipeline and no-retrieval on held-out questions → MLflow → a table.

    bash scripts/quickstart.sh                 # the README's first command (≈ 11 min on 2 idle cores, set-up included)
    bash scripts/quickstart.sh --small         # a reduced run (the CI test uses it)
    bash scripts/quickstart.sh --preset smollm2   # SmolLM2-135M (offline GGUF) instead of a tiny Llama

Every stage writes into ``--out`` (default ``runs/quickstart``) and is skipped when its output is
complete, so a rerun is cheap and an interrupted run resumes (training from its last checkpoint).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Preset:
    recipe: str
    world: list[str]
    eval_examples: int
    extra_train: list[str] = field(default_factory=list)


PRESETS = {
    # 2 ranks × 4 rows = the global batch of 8 the tiny recipe was tuned with on one rank.
    "tiny": Preset("configs/tiny-cpu.yaml", [], eval_examples=50, extra_train=["optim.micro_batch_size=4"]),
    # 60 steps, not the recipe's 150: held-out retrieval is 1.0 by step 50 (README's run, 72 min).
    "smollm2": Preset("configs/smollm2-cpu.yaml", [], eval_examples=30,
                      extra_train=["optim.micro_batch_size=2", "optim.max_steps=60"]),
}
SMALL = dict(world=["world.n_train_questions=300", "world.n_dev_questions=30", "world.n_train_el=50",
                    "world.n_dev_el=10", "world.n_train_entities=150", "world.n_dev_entities=40"],
             steps=6, eval_examples=6,
             train=["model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=1", "model.num_heads=2",
                    "eval_every=0", "checkpoint_every=3", "optim.micro_batch_size=4"])

# (label, checkpoint, evaluation method): the pipeline baselines pair a separate retriever with the
# generator trained without a retrieval loss (git); two-pass re-encodes with the OneGen model itself.
METHODS = [
    ("onegen", "onegen", "onegen"),
    ("two-pass", "onegen", "two-pass"),
    ("pipeline-bm25", "git", "pipeline-bm25"),
    ("pipeline-minilm", "git", "pipeline-minilm"),
    ("no-retrieval", "git", "no-retrieval"),
]


def _env() -> dict:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    env["PYTHONUNBUFFERED"] = "1"
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _run(cmd: list[str], log_path: Path, title: str) -> None:
    """Run a stage, teeing its output to a log; on failure show the log's tail and stop."""
    print(f"\n==> {title}\n    $ {' '.join(cmd)}", flush=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    tty = sys.stdout.isatty()
    last_bar, bar_open = 0.0, False
    with open(log_path, "w", buffering=1) as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:  # text mode: a progress bar's "\r" updates arrive as lines too
            log.write(line)
            text = line.rstrip("\n")
            if _worth_showing(line):
                sys.stdout.write(("\n" if bar_open else "") + "    " + text[-200:] + "\n")
                bar_open = False
            elif _is_progress(text) and time.time() - last_bar >= (1.0 if tty else PROGRESS_EVERY_S):
                # long stages (SmolLM2 training: minutes per bar) show their bar: in place on a
                # terminal, one line every PROGRESS_EVERY_S seconds in a log
                sys.stdout.write(("\r    " + text.strip()[-150:]) if tty else ("    " + text.strip()[-150:] + "\n"))
                last_bar, bar_open = time.time(), tty
            sys.stdout.flush()
        rc = proc.wait()
    if bar_open:
        sys.stdout.write("\n")
    if rc != 0:
        tail = log_path.read_text().splitlines()[-40:]
        raise SystemExit(f"stage '{title}' failed (exit {rc}); last lines of {log_path}:\n" + "\n".join(tail))
    print(f"    ({time.time() - t0:.0f} s, log: {log_path})", flush=True)


PROGRESS_EVERY_S = 60.0
_BAR = re.compile(r"^\s*[^|:]{1,80}:\s+\d+%\|")  # a tqdm bar: "train:  40%|████  | 24/60 [...]"


def _is_progress(text: str) -> bool:
    return bool(_BAR.match(text)) and not text.lstrip().startswith("Loading")  # transformers' weight loading


def _worth_showing(line: str) -> bool:
    """Stage summaries, not library chatter (the full output is in the log)."""
    return line.startswith(("[prep]", "[world]", "[train]", "[eval]", "[index]", "error")) or "| " in line[:4]


def _torchrun(ranks: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/quickstart.sh", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/quickstart", help="where everything goes")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="tiny Llama (default) or SmolLM2-135M")
    p.add_argument("--small", action="store_true", help="a reduced run: minutes, for CI")
    p.add_argument("--ranks", type=int, default=2, help="DeepSpeed ranks (CPU processes) for training")
    p.add_argument("--eval-examples", type=int, help="held-out questions per method")
    p.add_argument("--steps", type=int, help="training steps of both models (default: the preset's: 300 tiny, 60 SmolLM2, "
                   "whose steps take about 21 s each on 2 CPU cores)")
    ns = p.parse_args(argv)
    if ns.steps is not None and ns.steps < 1:
        p.error(f"--steps must be >= 1, got {ns.steps}")

    t_start = time.time()
    preset = PRESETS[ns.preset]
    out = (ROOT / ns.out).resolve() if not Path(ns.out).is_absolute() else Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{out / 'mlflow.db'}"
    experiment = "quickstart" + ("-small" if ns.small else "") + ("" if ns.preset == "tiny" else f"-{ns.preset}")
    n_eval = ns.eval_examples or (SMALL["eval_examples"] if ns.small else preset.eval_examples)
    world = out / "world"
    print(f"onegen quickstart: preset={ns.preset}{' (small)' if ns.small else ''}, output in {out}", flush=True)

    # 1. data
    world_args = SMALL["world"] if ns.small else preset.world
    tokenizer = ["tokenizer=smollm2"] if ns.preset == "smollm2" else []
    _run([sys.executable, "-m", "data_prep", "world", "--out", str(world), *world_args, *tokenizer],
         out / "logs" / "prep.log", "1/4 generate the synthetic world and prepare it (roles, mined negatives, Arrow shards)")

    # 2. training: OneGen and the git baseline, real DeepSpeed ZeRO-3 on CPU ranks
    train_over = preset.extra_train + (SMALL["train"] + [f"optim.max_steps={SMALL['steps']}"] if ns.small else [])
    if ns.steps is not None:
        train_over.append(f"optim.max_steps={ns.steps}")
    for mode in ("onegen", "git"):
        run_dir = out / f"train-{mode}"
        summary = run_dir / "summary.json"
        if summary.exists() and (run_dir / "model" / "manifest.json").exists():
            print(f"\n==> 2/4 train {mode}: done before ({run_dir})")
            continue
        _run([*_torchrun(ns.ranks), str(ROOT / "pipeline" / "train.py"), "--config", str(ROOT / preset.recipe),
              f"data.train=[{world / 'rag_train'}]", f"data.eval=[{world / 'rag_dev'}]", f"output_dir={run_dir}",
              f"loss.mode={mode}", f"mlflow_tracking_uri={uri}", f"mlflow_experiment={experiment}",
              f"run_name=train-{mode}", *train_over],
             out / "logs" / f"train-{mode}.log", f"2/4 train {mode} ({ns.ranks} DeepSpeed ZeRO-3 ranks on CPU)")

    # 3. evaluation on the held-out split (entities never seen in training)
    for label, ckpt, method in METHODS:
        res = out / "eval" / label
        if (res / "metrics.json").exists():
            print(f"\n==> 3/4 evaluate {label}: done before ({res})")
            continue
        _run([sys.executable, "-m", "evaluation", "run", "--model", str(out / f"train-{ckpt}" / "model"),
              "--data", str(world / "rag_dev"), "--method", method, "--out", str(res), "--max-examples", str(n_eval),
              "--tracking-uri", uri, "--experiment", experiment, "--run-name", f"eval-{label}"],
             out / "logs" / f"eval-{label}.log", f"3/4 evaluate {label} (checkpoint: {ckpt})")

    # 4. the comparison
    _run([sys.executable, "-m", "evaluation", "compare", "--experiment", experiment, "--tracking-uri", uri,
          "--out", str(out / "comparison.png")], out / "logs" / "compare.log", "4/4 compare the runs")
    table = (out / "comparison.md")
    rows = {label: json.loads((out / "eval" / label / "metrics.json").read_text()) for label, _, _ in METHODS}
    _write_summary(out, rows, time.time() - t_start, ns)
    print("\n" + (out / "summary.md").read_text())
    print(f"Plots: {out / 'comparison.png'}, {out / 'train-onegen' / 'training_curves.png'}, "
          f"{out / 'train-git' / 'training_curves.png'}" + (f"\nTable: {table}" if table.exists() else ""))
    print(f"Open MLflow:  .venv/bin/mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000   "
          f"(then http://127.0.0.1:5000, experiment '{experiment}')")
    return 0


def _fmt(v) -> str:
    return "—" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def _write_summary(out: Path, rows: dict, wall: float, ns) -> None:
    keys = [("em", "EM"), ("f1", "F1"), ("recall_at_1_free", "Recall@1 (free)"),
            ("recall_at_1_tf", "Recall@1 (teacher-forced)"), ("s_per_question", "s / question")]
    lines = [f"# Quickstart result ({time.strftime('%Y-%m-%d')}, preset {ns.preset}{', small' if ns.small else ''}, "
             f"{os.cpu_count()} CPU cores, wall {wall / 60:.1f} min)", "",
             "| method | " + " | ".join(k[1] for k in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for label, m in rows.items():
        lines.append(f"| {label} | " + " | ".join(_fmt(_metric(m, k)) for k, _ in keys) + " |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps({"wall_s": wall, "methods": rows}, indent=2, default=str))


def _metric(m: dict, key: str):
    """A headline metric of an evaluation's metrics.json (None where it does not apply)."""
    return m.get("headline", {}).get(key)


if __name__ == "__main__":
    sys.exit(main())
