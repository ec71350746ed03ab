"""Evaluate a OneGen checkpoint: build its document index, answer/link with it, compare runs.

Commands:
  index     encode every document of a prepared dataset with the checkpoint ([RD]/[SE] states) into a
            faiss index dir (--rows N: only the first N rows' candidates + gold); a complete index of the
            same checkpoint + data is reused (cheap rerun)
  run       one method on one prepared dataset -> RESULTS_DIR (predictions.jsonl, metrics.json,
            plots/) + one MLflow run linked to the checkpoint's training run
  compare   the eval runs of an MLflow experiment side by side (rich table, PNG, CSV, markdown)
  log       log results dirs whose MLflow run was not logged (--no-mlflow, a dead server, a broken
            store) from their tracking.json: the same run, linked to its training run

Options: every flag of index/run/compare is a field of evaluation/config.py; --config RECIPE (YAML)
sets any field, key=value arguments after the flags override them (e.g. max_hops=2), and
`python -m evaluation run --help-config` lists every field with its default.

Methods (RAG; the task is read from the prepared dataset's manifest):
{methods}
Entity-linking datasets are evaluated with --method onegen only ([LK] states vs the [SE] index).

Metrics: EM/F1 (HotpotQA normalisation; --normalization official: the official script exactly);
answer_found (a non-empty final answer before EOS); Recall@1 by gold doc id in free generation
(hop-aligned) and teacher-forced (gold context; for pipelines the separate retriever with question +
gold text before [RQ]); EL micro P/R/F1 (GERBIL strong match) + mention-detection F1, linking
accuracy on gold mentions (el_link_acc_gold) vs a name-match baseline (el_name_match_acc_gold) over
the same KB (kb_size entities); tokens/s, s/question.

Index of a run: with --max-examples N in the distractor setting, only the documents the N rows can
retrieve (their candidates + gold) are encoded; the index manifest records the subset, and it is
reused only for runs over at most those rows.

Sharding (index and run): under torchrun/deepspeed every rank takes a contiguous slice of the
documents (index) or rows (run) and rank 0 merges; as separate jobs, --shard I/N (or --shard array in
a SLURM job array) then --merge N. The merged index or run equals a one-process one; a complete shard
is kept on a rerun (docs/slurm.md).

Precision: --dtype / --attn (default on CUDA: bf16 + flash-attn when installed, else fp32 + sdpa); the
choice is printed, written in the index manifest and logged as MLflow params. faiss on several GPUs
is sharded (each GPU holds 1/n of the index); --faiss-fp16 stores a flat index in fp16 there.

MLflow: default store sqlite:///<RESULTS_DIR>/../mlflow.db (so runs/eval/mlflow.db with the default
--out), or $MLFLOW_TRACKING_URI, or --tracking-uri URI; `--tracking-uri train` logs into the store of
the checkpoint's training run, next to it. Eval runs are top-level runs (the runs table shows them,
not folded under the training run), linked to it by the tag onegen.train_run_id. Tags:
onegen.stage=eval, onegen.method, onegen.dataset, onegen.model, onegen.mode, onegen.train_run_id;
metrics em, f1, recall_at_1_free, recall_at_1_tf, s_per_question. The run ends with one line:
[eval] METHOD: EM .. F1 .. R@1 free .. tf .. · s/question (n=..). Evaluations started together may
share one new sqlite store (it is made once, under a lock; a locked store is waited out); across
nodes use a tracking server (docs/slurm.md). When MLflow is down the results stay on disk with
RESULTS_DIR/tracking.json, and `log RESULTS_DIR...` logs them later.

Examples:
  python -m evaluation index --model runs/tiny-cpu/model --data runs/world/rag_dev --out runs/index/rag_dev
  python -m evaluation run --model runs/tiny-cpu/model --data runs/world/rag_dev --method onegen \\
      --index runs/index/rag_dev --max-examples 200
  python -m evaluation run --model runs/tiny-cpu/model --data runs/world/rag_dev --method pipeline-minilm
  python -m evaluation run --model runs/tiny-cpu/model --data runs/world/el_dev --method onegen
  python -m evaluation compare --experiment onegen --out runs/eval/compare.png
  python -m evaluation log runs/eval/rag_dev-onegen-tiny-cpu-model --tracking-uri sqlite:///runs/eval/mlflow.db
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from evaluation.config import DEFAULT_COMPARE_STORE, CompareConfig, IndexConfig, RunConfig
from onegen.config import help_text, load_config
from onegen.config_flags import add_config_flags, flag_overrides
from onegen.environment import apply_offline_defaults
from onegen.errors import ConfigError, OneGenError, run_cli
from onegen.methods import help_lines
from onegen.mlflow_tags import (EVAL_STAGE, TAG_LOGGED_LATER, TAG_REPLACED_BY, TAG_RESULTS_ID, TAG_STAGE,
                                TAG_TRAIN_RUN)

CONFIGS = {"index": IndexConfig, "run": RunConfig, "compare": CompareConfig}


def _config_args(p: argparse.ArgumentParser, cls: type) -> None:
    """The command's flags (one per field of ``cls``), its recipe, ``--help-config`` and ``key=value``."""
    add_config_flags(p, cls)
    p.add_argument("--config", metavar="RECIPE", help="YAML recipe with any of the fields below (flags and key=value "
                                                      "arguments override it)")
    p.add_argument("--help-config", action="store_true", help="list every field (recipe key) with its default and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="set any field, e.g. max_hops=2")


def _parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="python -m evaluation", description=__doc__.replace("{methods}", help_lines()),
                                formatter_class=fmt, allow_abbrev=False)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{index,run,compare,log}")
    _config_args(sub.add_parser(
        "index", help="build (or reuse) the checkpoint's document index of a prepared dataset", allow_abbrev=False,
        description="Encode every document of PREPARED_DIR/docs with the checkpoint (the final [RD]/[SE] state, "
                    "L2-normalised) and write a faiss index dir. A complete index for the same checkpoint + data + "
                    "kind is reused; --force rebuilds."), IndexConfig)
    _config_args(sub.add_parser(
        "run", help="evaluate one method on one prepared dataset", formatter_class=fmt, allow_abbrev=False,
        description="Answer (RAG) or link (EL) every row of a prepared dataset with the checkpoint and the chosen "
                    "retriever; write predictions.jsonl, metrics.json and plots into RESULTS_DIR and log an MLflow "
                    "run linked to the training run.\n\nMethods:\n" + help_lines()), RunConfig)
    _config_args(sub.add_parser(
        "compare", help="side-by-side table + chart of the eval runs of an experiment", allow_abbrev=False,
        description=f"Print the eval runs (tag {TAG_STAGE}={EVAL_STAGE}) of an MLflow experiment as a table and "
                    "write it as a PNG chart (grouped bars) plus CSV and markdown (same path, .csv / .md)."),
        CompareConfig)
    _add_log_parser(sub, fmt)
    return p


def _config(ns: argparse.Namespace):
    """The command's typed config: recipe, then flags, then ``key=value`` arguments."""
    cls = CONFIGS[ns.cmd]
    return load_config(cls, ns.config, flag_overrides(ns, cls) + list(ns.overrides))


def _add_log_parser(sub, fmt) -> None:
    pl = sub.add_parser("log", help="log results dirs into MLflow afterwards (e.g. after an outage)", formatter_class=fmt,
                        allow_abbrev=False, description=f"""\
Log evaluation results that are on disk but not in MLflow: runs made with --no-mlflow, while the
server was down, or while the store was unusable. Each RESULTS_DIR's tracking.json (written by
every `run`) holds the run as it was (or would have been) logged: experiment, run name, tags (the
link to the training run, {TAG_TRAIN_RUN}), params, metrics, artifacts, times and status. `log`
makes that same run in the store (plus the tag {TAG_LOGGED_LATER}), so `compare` shows it.

A results dir already logged there (a FINISHED run with its {TAG_RESULTS_ID} in that experiment)
is refused unless --force; a run the outage left unfinished is marked FAILED (tag
{TAG_REPLACED_BY}). Results changed since the evaluation (predictions.jsonl against manifest.json)
are refused. Training output dirs are not accepted: their metrics are in OUTPUT/metrics.jsonl.
Exit status 0 when every dir was logged, 2 otherwise.""")
    pl.add_argument("results", nargs="+", metavar="RESULTS_DIR", help="results dirs of `python -m evaluation run`")
    pl.add_argument("--tracking-uri", help="store to log into, or 'train' for the training run's store (default: the "
                                           "store the evaluation meant to use, recorded in tracking.json, else "
                                           "$MLFLOW_TRACKING_URI, else sqlite:///<RESULTS_DIR>/../mlflow.db)")
    pl.add_argument("--experiment", help="MLflow experiment (default: the evaluation's)")
    pl.add_argument("--force", action="store_true", help="log a results dir again even if the store has it")


def cmd_index(cfg: IndexConfig) -> int:
    # Each command imports what it runs here: `--help` and the other commands do not pay for torch/faiss.
    from evaluation.index_reuse import ensure_index
    from evaluation.sharding import launcher_shard, parse_shard

    if cfg.rows is not None and cfg.rows < 1:
        raise ConfigError(f"--rows must be >= 1, got {cfg.rows}")
    if cfg.shard is not None and cfg.merge is not None:
        raise ConfigError("--shard and --merge are separate steps: give one of them")
    shard = parse_shard(cfg.shard) if cfg.shard else (launcher_shard() if cfg.merge is None else None)
    if shard is not None or cfg.merge is not None:
        return _index_sharded(cfg, shard)
    man, built = ensure_index(cfg.model, cfg.data, cfg.out, kind=cfg.kind, force=cfg.force, device=cfg.device,
                              batch_size=cfg.batch_size, progress=cfg.progress, dtype=cfg.dtype, attn=cfg.attn,
                              params=cfg.faiss, rows=cfg.rows)
    _say_index(cfg.out, man, "built" if built else "reused")
    return 0


def _index_sharded(cfg: IndexConfig, shard: tuple[int, int] | None) -> int:
    """One shard (``--shard I/N``, or this rank's under a launcher: rank 0 then merges), or ``--merge N``."""
    from evaluation.index_reuse import reusable_index, say_reused  # (see cmd_index)
    from evaluation.index_shards import SHARD_FILES, SHARD_STAGE, encode_shard, merge_shards
    from evaluation.sharding import set_up_rank, wait_for_shards

    launched = cfg.shard is None and cfg.merge is None
    device = set_up_rank() if launched and cfg.device is None else cfg.device
    if not cfg.force:
        man, _ = reusable_index(cfg.model, cfg.data, cfg.out, kind=cfg.kind, device=device, dtype=cfg.dtype,
                                attn=cfg.attn, rows=cfg.rows, log=lambda m: None)
        if man is not None:
            say_reused(man, cfg.out, cfg.rows, cfg.faiss, print)
            return 0
    if shard is not None:
        i, n = shard
        encode_shard(cfg.model, cfg.data, cfg.out, i, n, batch_size=cfg.batch_size, device=device, dtype=cfg.dtype,
                     attn=cfg.attn, rows=cfg.rows, progress=cfg.progress)
        if not launched or i != 0:
            return 0
        wait_for_shards(cfg.out, n, SHARD_STAGE, SHARD_FILES)
    man = merge_shards(cfg.out, cfg.merge or shard[1], kind=cfg.kind, params=cfg.faiss)  # type: ignore[index]
    _say_index(cfg.out, man, "merged")
    return 0


def _say_index(out: Path, man: dict, how: str) -> None:
    from evaluation.precision import LEGACY  # (see cmd_index)

    dtype, attn = (man.get(k, LEGACY[k]) for k in ("dtype", "attn"))
    sub = man.get("subset")
    what = f"{man['count']} documents" + (f" (the first {sub['rows']} rows' own, of {sub['of_docs']})" if sub else "")
    print(f"{how} {out}: {what}, dim {man['dim']}, kind {man['kind']}, model {man['model_fingerprint'][:12]}, "
          f"{dtype} + {attn}")


def cmd_run(cfg: RunConfig) -> int:
    # what the command runs, imported by it (see cmd_index)
    from rich.console import Console
    from rich.table import Table

    from evaluation.run import run_eval

    console = Console(soft_wrap=True)
    say = lambda m: console.print(m, highlight=False, markup=False)  # noqa: E731 (paths may hold [ ])
    say(f"evaluation run: {cfg.method} on {cfg.data} with {cfg.model} ({cfg.setting})")
    res = run_eval(cfg, log=say)
    if res is None:  # this process wrote its shard; the merge reports the run
        return 0
    head = res.metrics["headline"]
    t = Table(title=f"{cfg.method} · {res.metrics['dataset']} · {res.metrics['task']} (n={head['n']})")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in head.items():
        if v is not None and not k.startswith(("recall_at_1_free_hop", "recall_at_1_tf_hop")):
            t.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    console.print(t)
    say(f"results     {res.out}")
    for name, path in res.files.items():
        say(f"  {name:<12}{path}")
    if res.run_id:
        say(f"MLflow run  {res.run_id} ({res.tracking_uri})")
        say(f"compare     python -m evaluation compare --experiment {cfg.experiment} --tracking-uri {res.tracking_uri}")
    # Last, and plain: the quickstart shows `[eval]` lines of a stage's output on its console.
    print(headline_line(cfg.method, head), flush=True)
    return 0


def _f(v, digits: int = 2) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def headline_line(method: str, head: dict) -> str:
    """``[eval] onegen: EM 0.80 F1 0.80 R@1 free 1.00 tf 1.00 · 3.04 s/question (n=30)`` (EL: P/R/F1)."""
    if "el_f1" in head:
        what = (f"EL F1 {_f(head.get('el_f1'))} P {_f(head.get('el_precision'))} R {_f(head.get('el_recall'))} "
                f"MD F1 {_f(head.get('el_md_f1'))} R@1 tf {_f(head.get('recall_at_1_tf'))}")
        unit = "text"
    else:
        what = f"EM {_f(head.get('em'))} F1 {_f(head.get('f1'))}"
        if head.get("recall_at_1_free") is not None or head.get("recall_at_1_tf") is not None:
            what += f" R@1 free {_f(head.get('recall_at_1_free'))} tf {_f(head.get('recall_at_1_tf'))}"
        unit = "question"
    return f"[eval] {method}: {what} · {_f(head.get('s_per_question'), 3)} s/{unit} (n={head.get('n', '?')})"


def cmd_compare(cfg: CompareConfig) -> int:
    from evaluation.compare import compare  # what the command runs, imported by it (see cmd_index)
    from evaluation.tracking import sqlite_uri

    uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or sqlite_uri(DEFAULT_COMPARE_STORE)
    compare(uri, cfg.experiment, str(cfg.out), all_runs=cfg.all, models=cfg.models)
    return 0


def cmd_log(ns: argparse.Namespace) -> int:
    from evaluation.logbook import log_results  # what the command runs, imported by it (see cmd_index)

    failed = 0
    for d in ns.results:
        try:
            log_results(d, tracking_uri=ns.tracking_uri, experiment=ns.experiment, force=ns.force)
        except OneGenError as e:
            print(f"error: {e}", file=sys.stderr)
            failed += 1
    if failed and len(ns.results) > 1:
        print(f"{failed} of {len(ns.results)} results dirs were not logged", file=sys.stderr)
    return 2 if failed else 0


def main(argv: list[str] | None = None) -> int:
    apply_offline_defaults()  # before torch/transformers/mlflow are imported (they read these once)
    ns = _parser().parse_args(argv)
    return run_cli(lambda: _dispatch(ns), interrupted="a finished index is kept; rerun the same command")


def _dispatch(ns: argparse.Namespace) -> int:
    if ns.cmd == "log":
        return cmd_log(ns)
    if ns.help_config:
        print(help_text(CONFIGS[ns.cmd]))
        return 0
    return {"index": cmd_index, "run": cmd_run, "compare": cmd_compare}[ns.cmd](_config(ns))
