"""The real-benchmark job: prepare real HotpotQA / 2WikiMultihopQA / entity-linking samples, split
them by question id into training and held-out parts, train one OneGen model on the training parts,
and evaluate it on the held-out parts against retriever pipelines that share its generator.

    bash scripts/benchmark.sh                                   # CPU: SmolLM2-135M-Instruct, ../shared/data
    bash scripts/benchmark.sh --config configs/benchmark/toy.yaml   # minutes: CI's size (tiny model)
    bash scripts/benchmark.sh --config configs/benchmark/gpu.yaml   # the same stages on full data, on GPUs
    bash scripts/benchmark.sh --help-config                     # every field of the recipe

Stages (each reused on a rerun with the same options, see ``onegen.stages``):
  1. prep-NAME-train / prep-NAME-heldout   data_prep with the model's tokenizer; the split is recorded
                                           in each manifest (no question is on both sides)
  2. train-onegen                          pipeline/train.py (DeepSpeed ZeRO-3) on every training part,
                                           with a periodic held-out evaluation (the curves)
  3. eval-NAME-METHOD                      onegen, two-pass, pipeline-bm25, pipeline-minilm, no-retrieval
                                           on each RAG held-out part (distractor setting); onegen on each
                                           EL held-out part (micro-F1, gold-mention accuracy vs name match)
  4. compare + summary.md / summary.json / benchmark.png, one MLflow experiment; the bars are checked
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from onegen.benchmark_config import BenchmarkConfig, ElSet, RagSet, resolve
from onegen.benchmark_summary import write_summary
from onegen.config import help_text, load_config
from onegen.environment import apply_offline_defaults
from onegen.errors import ConfigError, OneGenError
from onegen.methods import METHODS
from onegen.stages import ROOT, Stage, run_stages, stage_seconds, torchrun

PY = sys.executable


def _prep_cmd(cfg: BenchmarkConfig, kind: str, src: Path, out: Path, part: str, fraction: float,
              kb: str | None = None) -> list[str]:
    cmd = [PY, "-m", "data_prep", "prepare", "--kind", kind, "--input", str(src), "--out", str(out),
           "--tokenizer", cfg.tokenizer, "--on-error", "skip"]
    if kb:
        cmd += ["--kb", str(resolve(kb, resolve(cfg.data_root, ROOT)))]
    if part != "all":
        cmd += [f"holdout.part={part}", f"holdout.fraction={fraction}", f"holdout.seed={cfg.seed}"]
    return cmd + list(cfg.prep)


def _input(cfg: BenchmarkConfig, rel: str, what: str) -> Path:
    path = resolve(rel, resolve(cfg.data_root, ROOT))
    if not path.is_file():
        raise ConfigError(f"{what}: {path} does not exist (data_root={cfg.data_root}; the samples of "
                          f"../shared/data are described in its README)")
    return path


def _prep(name: str, cmd: list[str], out: Path, src: Path) -> Stage:
    return Stage(f"prep-{name}", f"1/4 prepare {name} ({src.name})", cmd, out, done=[out / "manifest.json"])


def rag_stages(cfg: BenchmarkConfig, s: RagSet, data: Path) -> tuple[list[Stage], list[Path], Path]:
    """The prep stages of one QA dataset, its training directories (the split's, then ``extra_train``'s) and
    its held-out one."""
    src = _input(cfg, s.input, f"rag '{s.name}' input")
    train, held = data / f"{s.name}-train", data / f"{s.name}-heldout"
    if s.heldout_input:
        other = _input(cfg, s.heldout_input, f"rag '{s.name}' heldout_input")
        stages = [_prep(f"{s.name}-train", _prep_cmd(cfg, s.kind, src, train, "all", 0.0), train, src),
                  _prep(f"{s.name}-heldout", _prep_cmd(cfg, s.kind, other, held, "all", 0.0), held, other)]
    else:
        stages = [_prep(f"{s.name}-train", _prep_cmd(cfg, s.kind, src, train, "train", s.heldout_fraction), train, src),
                  _prep(f"{s.name}-heldout", _prep_cmd(cfg, s.kind, src, held, "heldout", s.heldout_fraction), held, src)]
    trains = [train]
    for i, rel in enumerate(s.extra_train, start=2):
        extra, d = _input(cfg, rel, f"rag '{s.name}' extra_train[{i - 2}]"), data / f"{s.name}-train{i}"
        stages.append(_prep(f"{s.name}-train{i}", _prep_cmd(cfg, s.kind, extra, d, "all", 0.0), d, extra))
        trains.append(d)
    return stages, trains, held


def el_stages(cfg: BenchmarkConfig, s: ElSet, data: Path) -> tuple[list[Stage], Path | None, Path | None]:
    """The prep stages of one EL dataset and its (train or None, evaluated or None) directories."""
    src = _input(cfg, s.input, f"el '{s.name}' input")
    if s.use == "train":
        d = data / f"{s.name}-train"
        return [_prep(f"{s.name}-train", _prep_cmd(cfg, "elevant", src, d, "all", 0.0, s.kb), d, src)], d, None
    if s.use == "eval":
        d = data / f"{s.name}-eval"
        return [_prep(f"{s.name}-eval", _prep_cmd(cfg, "elevant", src, d, "all", 0.0, s.kb), d, src)], None, d
    train, held = data / f"{s.name}-train", data / f"{s.name}-heldout"
    return ([_prep(f"{s.name}-train", _prep_cmd(cfg, "elevant", src, train, "train", s.heldout_fraction, s.kb), train, src),
             _prep(f"{s.name}-heldout", _prep_cmd(cfg, "elevant", src, held, "heldout", s.heldout_fraction, s.kb), held, src)],
            train, held)


def train_stage(cfg: BenchmarkConfig, out: Path, train_dirs: list[Path], eval_dirs: list[Path], uri: str,
                weights: list[float]) -> Stage:
    run_dir = out / "train-onegen"
    recipe = resolve(cfg.train.recipe, ROOT)
    if not recipe.is_file():
        raise ConfigError(f"train.recipe: {recipe} does not exist")
    # all-1 weights are left out: the command (and so a finished run's reuse) stays what it was without them
    mix = [f"data.train_weights=[{','.join(map(str, weights))}]"] if any(w != 1.0 for w in weights) else []
    cmd = [*torchrun(cfg.train.ranks), str(ROOT / "pipeline" / "train.py"), "--config", str(recipe),
           f"data.train=[{','.join(map(str, train_dirs))}]", *mix, f"data.eval=[{','.join(map(str, eval_dirs))}]",
           f"output_dir={run_dir}", f"loss.mode={cfg.train.mode}", f"mlflow_tracking_uri={uri}",
           f"mlflow_experiment={cfg.name}", "run_name=train-onegen", *cfg.train.overrides]
    return Stage("train-onegen", f"2/4 train OneGen ({cfg.train.ranks} DeepSpeed ZeRO-3 rank(s))", cmd, run_dir,
                 done=[run_dir / "summary.json", run_dir / "model" / "manifest.json"], inputs=list(train_dirs),
                 options={"--config": cfg.train.recipe, "train.overrides": " ".join(cfg.train.overrides + mix),
                          "--ranks": cfg.train.ranks}, keep=True)


# the methods that search the checkpoint's own [RD] index (onegen, two-pass): it is built once per dataset
SHARED_INDEX = tuple(name for name, m in METHODS.items() if m.own_index)


def index_stage(out: Path, name: str, data: Path, n: int) -> Stage:
    """The held-out part's [RD] index, over the evaluated questions' own paragraphs only (``--rows``)."""
    model, idx = out / "train-onegen" / "model", out / "index" / name
    cmd = [PY, "-m", "evaluation", "index", "--model", str(model), "--data", str(data), "--out", str(idx)]
    if n > 0:
        cmd += ["--rows", str(n)]
    return Stage(f"index-{name}", f"3/4 index {name}'s held-out paragraphs with the OneGen checkpoint", cmd, idx,
                 done=[idx / "manifest.json"], inputs=[model, data], options={"--eval-examples": n})


def eval_stage(cfg: BenchmarkConfig, out: Path, name: str, data: Path, method: str, n: int, uri: str,
               rag: bool = True) -> Stage:
    model, res = out / "train-onegen" / "model", out / "eval" / f"{name}-{method}"
    index = out / "index" / name
    cmd = [PY, "-m", "evaluation", "run", "--model", str(model), "--data", str(data), "--method", method,
           "--out", str(res), "--gen-batch-size", str(cfg.eval.gen_batch_size), "--normalization", cfg.eval.normalization,
           "--tracking-uri", uri, "--experiment", cfg.name, "--run-name", f"eval-{name}-{method}"]
    if n > 0:
        cmd += ["--max-examples", str(n)]
    if rag:  # (entity linking's default budget follows each text's length)
        cmd += ["--max-new-tokens", str(cfg.eval.max_new_tokens)]
    if rag and cfg.eval.pipeline_query != "full" and not METHODS[method].own_index and METHODS[method].retriever != "none":
        cmd += ["--pipeline-query", cfg.eval.pipeline_query]  # (full, the default, is left out: older runs stay reusable)
    shared = rag and method in SHARED_INDEX
    if shared:
        cmd += ["--index", str(index)]
    return Stage(f"eval-{name}-{method}", f"3/4 evaluate {method} on {name}", cmd, res,
                 done=[res / "metrics.json", res / "manifest.json"], inputs=[model, data, *([index] if shared else [])],
                 options={"--eval-examples": n, "--normalization": cfg.eval.normalization})


def build_stages(cfg: BenchmarkConfig, out: Path) -> tuple[list[Stage], dict]:
    """Every stage, in order, and what the summary needs to find their outputs."""
    uri = f"sqlite:///{out / 'mlflow.db'}"
    data = out / "data"
    stages: list[Stage] = []
    train_dirs: list[Path] = []
    weights: list[float] = []
    rag_eval: dict[str, Path] = {}
    el_eval: dict[str, Path] = {}
    for s in cfg.rag:
        st, trains, held = rag_stages(cfg, s, data)
        stages += st
        train_dirs += trains
        weights += [s.train_weight] * len(trains)
        rag_eval[s.name] = held
    for e in cfg.el:
        st, train, held = el_stages(cfg, e, data)
        stages += st
        if train is not None:
            train_dirs.append(train)
            weights.append(e.train_weight)
        if held is not None:
            el_eval[e.name] = held
    stages.append(train_stage(cfg, out, train_dirs, list(rag_eval.values()), uri, weights))
    for s in cfg.rag:
        if any(m in SHARED_INDEX for m in cfg.eval.methods):
            stages.append(index_stage(out, s.name, rag_eval[s.name], s.eval_examples))
        stages += [eval_stage(cfg, out, s.name, rag_eval[s.name], m, s.eval_examples, uri) for m in cfg.eval.methods]
    for e in cfg.el:
        if e.name in el_eval:
            stages.append(eval_stage(cfg, out, e.name, el_eval[e.name], "onegen", e.eval_examples, uri, rag=False))
    evals = [st.out for st in stages if st.name.startswith("eval-")]
    stages.append(Stage("compare", "4/4 compare the runs (MLflow)",
                        [PY, "-m", "evaluation", "compare", "--experiment", cfg.name, "--tracking-uri", uri,
                         "--out", str(out / "comparison.png"), f"models=[{out / 'train-onegen' / 'model'}]"],
                        out / "comparison.png", done=[out / "comparison.png"], inputs=evals, file=True))
    layout = {"uri": uri, "rag": {k: str(v) for k, v in rag_eval.items()}, "el": {k: str(v) for k, v in el_eval.items()},
              "train_dirs": [str(p) for p in train_dirs], "methods": list(cfg.eval.methods)}
    return stages, layout


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/benchmark.sh", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--config", default="configs/benchmark/cpu.yaml", help="the benchmark recipe (default: %(default)s)")
    p.add_argument("--out", help="where everything goes (default runs/<recipe name>)")
    p.add_argument("--steps", type=int, help="training steps (appended to train.overrides as optim.max_steps)")
    p.add_argument("--eval-examples", type=int, help="held-out questions per RAG dataset and method (every rag set)")
    p.add_argument("--help-config", action="store_true", help="list every field of the recipe and exit")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the recipe (e.g. eval.normalization=official)")
    return p.parse_args(argv)


def load(ns: argparse.Namespace) -> BenchmarkConfig:
    cfg = load_config(BenchmarkConfig, resolve(ns.config, ROOT), ns.overrides)
    if ns.steps is not None:
        if ns.steps < 1:
            raise ConfigError(f"--steps must be >= 1, got {ns.steps}")
        cfg.train.overrides.append(f"optim.max_steps={ns.steps}")
    if ns.eval_examples is not None:
        for s in cfg.rag:
            s.eval_examples = ns.eval_examples
    return cfg


def main(argv: list[str] | None = None) -> int:
    apply_offline_defaults()
    ns = _parse(argv)
    if ns.help_config:
        print(help_text(BenchmarkConfig))
        print("\neach item of rag:\n" + help_text(RagSet, "rag[].") + "\n\neach item of el:\n" + help_text(ElSet, "el[]."))
        return 0
    t0 = time.time()
    try:
        cfg = load(ns)
        out = resolve(ns.out or f"runs/benchmark-{Path(ns.config).stem}", Path.cwd())
        out.mkdir(parents=True, exist_ok=True)
        stages, layout = build_stages(cfg, out)
    except OneGenError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"onegen benchmark: {ns.config}, {len(stages)} stages, output in {out}", flush=True)
    run_stages(stages, out)
    layout["seconds"] = stage_seconds(stages)
    result = write_summary(out, cfg, layout, time.time() - t0)
    print("\n" + (out / "summary.md").read_text())
    failed = [b for b in result["bars"] if b["ok"] is False]
    print(f"bars: {sum(b['ok'] is True for b in result['bars'])} met, {len(failed)} not met"
          + "".join(f"\n  not met: {b['bar']} ({b['detail']})" for b in failed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
