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
import sys
from pathlib import Path

from onegen.environment import apply_offline_defaults
from onegen.errors import ConfigError, OneGenError
from onegen.methods import METHOD_NAMES, help_lines
from onegen.mlflow_tags import (EVAL_STAGE, TAG_LOGGED_LATER, TAG_REPLACED_BY, TAG_RESULTS_ID, TAG_STAGE,
                                TAG_TRAIN_RUN)

# = "auto" + onegen.devices.DTYPES / ATTENTIONS (spelled out: `--help` does not import torch; a test checks)
DTYPE_NAMES = ["auto", "fp32", "bf16", "fp16"]
ATTN_NAMES = ["auto", "sdpa", "eager", "flash_attention_2"]
NORMALIZATION_NAMES = ("default", "official")  # = evaluation.metrics.NORMALIZATIONS (a test checks)
DEFAULT_COMPARE_URI_DB = Path("runs") / "eval" / "mlflow.db"


def _add_precision_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="auto",
                   help="model dtype (default auto: bf16 on a CUDA GPU that supports it, else fp32; on CPU fp32)")
    p.add_argument("--attn", choices=ATTN_NAMES, default="auto",
                   help="attention kernel (default auto: flash_attention_2 on CUDA with bf16/fp16 when flash-attn is "
                        "installed, else sdpa; flash_attention_2 needs bf16/fp16 and CUDA). The resolved dtype and "
                        "attention are printed, written in the index manifest and logged as MLflow params; an index "
                        "built in another precision is rebuilt, not reused")
    p.add_argument("--faiss-fp16", action="store_true",
                   help="GPU faiss: hold a flat index's vectors in fp16 on the GPUs (half the memory, scores to ~1e-3). "
                        "On several GPUs the index is sharded (each holds 1/n of it) either way")


def _parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="python -m evaluation", description=__doc__.replace("{methods}", help_lines()),
                                formatter_class=fmt, allow_abbrev=False)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{index,run,compare,log}")

    pi = sub.add_parser("index", help="build (or reuse) the checkpoint's document index of a prepared dataset",
                        allow_abbrev=False,
                        description="Encode every document of PREPARED_DIR/docs with the checkpoint (the final "
                                    "[RD]/[SE] state, L2-normalised) and write a faiss index dir. A complete index "
                                    "for the same checkpoint + data + kind is reused; --force rebuilds.")
    pi.add_argument("--model", required=True, help="exported checkpoint dir (pipeline/train.py OUTPUT/model)")
    pi.add_argument("--data", required=True, help="prepared dataset dir (data_prep output)")
    pi.add_argument("--out", required=True, help="index dir to write")
    pi.add_argument("--kind", choices=["flat", "ivf", "hnsw"], default="flat",
                    help="flat: exact inner product (default); ivf / hnsw: approximate, for large pools")
    pi.add_argument("--batch-size", type=int, default=64, help="documents per forward (sorted by length first)")
    pi.add_argument("--rows", type=int, metavar="N",
                    help="encode only the documents the first N query rows can retrieve in the distractor setting "
                         "(their candidates + gold positives): a subset index, recorded in its manifest and used only "
                         "by runs over at most N rows (default: every document)")
    pi.add_argument("--device", help="cpu / cuda (default: cuda when available)")
    _add_precision_args(pi)
    pi.add_argument("--force", action="store_true", help="rebuild even if a complete index is there")
    pi.add_argument("--quiet", action="store_true", help="no progress bars")

    pr = sub.add_parser("run", help="evaluate one method on one prepared dataset", formatter_class=fmt, allow_abbrev=False,
                        description="Answer (RAG) or link (EL) every row of a prepared dataset with the checkpoint "
                                    "and the chosen retriever; write predictions.jsonl, metrics.json and plots into "
                                    "RESULTS_DIR and log an MLflow run linked to the training run.")
    pr.add_argument("--model", required=True, help="exported checkpoint dir")
    pr.add_argument("--data", required=True, help="prepared dataset dir (its manifest says rag or el)")
    pr.add_argument("--method", choices=METHOD_NAMES, default="onegen", help="retrieval method (default onegen)")
    pr.add_argument("--index", help="index dir built by `index` for this checkpoint + data (default: built into "
                                    "RESULTS_DIR/index when the method needs one)")
    pr.add_argument("--setting", choices=["distractor", "open"], default="distractor",
                    help="distractor: rank each question's own candidate paragraphs; open: the whole pool")
    pr.add_argument("--max-examples", type=int, help="evaluate only the first N rows")
    pr.add_argument("--out", help="RESULTS_DIR (default runs/eval/<dataset>-<method>-<model>)")
    pr.add_argument("--kind", choices=["flat", "ivf", "hnsw"], default="flat", help="kind of an index built on the fly")
    pr.add_argument("--max-new-tokens", type=int, help="most generated tokens per question (RAG default 64; EL "
                                                       "default 2 x text tokens + 16)")
    pr.add_argument("--max-hops", type=int, default=4, help="most retrievals per question (RAG)")
    pr.add_argument("--force-retrieval-every", type=int, metavar="N",
                    help="insert [RQ] after every N generated tokens instead of letting the model decide (smoke "
                         "tests of an untrained checkpoint; not a benchmark setting)")
    pr.add_argument("--k", type=int, default=5, help="documents retrieved per query (top-1 inserted; recall@k)")
    pr.add_argument("--pipeline-query", choices=["full", "latest", "lead"], default="full",
                    help="pipelines' query at each [RQ]: full (default) question + all the model wrote; latest: question "
                         "+ what it wrote since the previous retrieval; lead: that alone (full still names hop 1 at hop 2)")
    pr.add_argument("--normalization", choices=list(NORMALIZATION_NAMES), default="default",
                    help="answer normalisation of EM/F1. default: the HotpotQA rules (lower-case, delete punctuation, "
                         "drop a/an/the, collapse whitespace) plus NFC and deleting Unicode punctuation too (curly "
                         "quotes, dashes: O’Brien == O'Brien). official: exactly the official HotpotQA script "
                         "(ASCII string.punctuation only, no NFC), for numbers comparable with published ones")
    pr.add_argument("--batch-size", type=int, default=32, help="rows per forward of the teacher-forced pass")
    pr.add_argument("--gen-batch-size", type=int, default=1,
                    help="questions (RAG) or texts (EL) decoded together, one batched forward per step (default "
                         "1; same outputs, more per second; s/question is then a throughput, not a latency)")
    pr.add_argument("--device", help="cpu / cuda (default: cuda when available)")
    _add_precision_args(pr)
    pr.add_argument("--tracking-uri", help="MLflow tracking URI, or 'train' for the training run's store "
                                           "(default $MLFLOW_TRACKING_URI, else sqlite:///<RESULTS_DIR>/../mlflow.db)")
    pr.add_argument("--experiment", default="onegen", help="MLflow experiment (default onegen)")
    pr.add_argument("--run-name", help="MLflow run name (default <method>:<dataset>:<model>)")
    pr.add_argument("--no-mlflow", action="store_true", help="write results to disk only")
    pr.add_argument("--quiet", action="store_true", help="no progress bars")

    pc = sub.add_parser("compare", help="side-by-side table + chart of the eval runs of an experiment", allow_abbrev=False,
                        description=f"Print the eval runs (tag {TAG_STAGE}={EVAL_STAGE}) of an MLflow experiment as a "
                                    "table and write it as a PNG chart (grouped bars) plus CSV and markdown "
                                    "(same path, .csv / .md).")
    pc.add_argument("--experiment", default="onegen", help="MLflow experiment (default onegen)")
    pc.add_argument("--tracking-uri", help=f"MLflow tracking URI (default $MLFLOW_TRACKING_URI, else "
                                           f"sqlite:///{DEFAULT_COMPARE_URI_DB})")
    pc.add_argument("--out", default=str(Path("runs") / "eval" / "compare.png"),
                    help="PNG path (default runs/eval/compare.png); .csv and .md are written beside it")
    pc.add_argument("--all", action="store_true", help="every run, not only the latest per method/model/dataset")
    _add_log_parser(sub, fmt)
    return p


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


def cmd_index(ns: argparse.Namespace) -> int:
    from evaluation.index import IndexParams
    from evaluation.precision import LEGACY
    from evaluation.index_reuse import ensure_index

    if ns.rows is not None and ns.rows < 1:
        raise ConfigError(f"--rows must be >= 1, got {ns.rows}")
    man, built = ensure_index(ns.model, ns.data, ns.out, kind=ns.kind, force=ns.force, device=ns.device,
                              batch_size=ns.batch_size, progress=not ns.quiet, dtype=ns.dtype, attn=ns.attn,
                              params=IndexParams(faiss_fp16=ns.faiss_fp16), rows=ns.rows)
    dtype, attn = (man.get(k, LEGACY[k]) for k in ("dtype", "attn"))
    sub = man.get("subset")
    what = f"{man['count']} documents" + (f" (the first {sub['rows']} rows' own, of {sub['of_docs']})" if sub else "")
    print(f"{'built' if built else 'reused'} {ns.out}: {what}, dim {man['dim']}, kind {man['kind']}, "
          f"model {man['model_fingerprint'][:12]}, {dtype} + {attn}")
    return 0


def cmd_run(ns: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from evaluation.run import EvalRequest, run_eval

    console = Console(soft_wrap=True)
    req = EvalRequest(model=Path(ns.model), data=Path(ns.data), method=ns.method,
                      index=Path(ns.index) if ns.index else None, out=Path(ns.out) if ns.out else None,
                      setting=ns.setting, max_examples=ns.max_examples, kind=ns.kind, max_new_tokens=ns.max_new_tokens,
                      max_hops=ns.max_hops, k=ns.k, force_retrieval_every=ns.force_retrieval_every,
                      device=ns.device, dtype=ns.dtype, attn=ns.attn, faiss_fp16=ns.faiss_fp16,
                      normalization=ns.normalization, pipeline_query=ns.pipeline_query,
                      batch_size=ns.batch_size, gen_batch_size=ns.gen_batch_size,
                      tracking=not ns.no_mlflow, tracking_uri=ns.tracking_uri, experiment=ns.experiment,
                      run_name=ns.run_name, progress=not ns.quiet)
    console.print(f"evaluation run: {ns.method} on {ns.data} with {ns.model} ({ns.setting})", markup=False)
    res = run_eval(req, log=lambda m: console.print(m, highlight=False, markup=False))
    head = res.metrics["headline"]
    t = Table(title=f"{ns.method} · {res.metrics['dataset']} · {res.metrics['task']} (n={head['n']})")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in head.items():
        if v is not None and not k.startswith(("recall_at_1_free_hop", "recall_at_1_tf_hop")):
            t.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    console.print(t)
    say = lambda m: console.print(m, highlight=False, markup=False)  # noqa: E731 (paths may hold [ ])
    say(f"results     {res.out}")
    for name, path in res.files.items():
        say(f"  {name:<12}{path}")
    if res.run_id:
        say(f"MLflow run  {res.run_id} ({res.tracking_uri})")
        say(f"compare     python -m evaluation compare --experiment {ns.experiment} --tracking-uri {res.tracking_uri}")
    # Last, and plain: the quickstart shows `[eval]` lines of a stage's output on its console.
    print(headline_line(ns.method, head), flush=True)
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


def cmd_compare(ns: argparse.Namespace) -> int:
    import os

    from evaluation.compare import compare
    from evaluation.tracking import sqlite_uri

    uri = ns.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or sqlite_uri(DEFAULT_COMPARE_URI_DB)
    compare(uri, ns.experiment, ns.out, all_runs=ns.all)
    return 0


def cmd_log(ns: argparse.Namespace) -> int:
    from evaluation.logbook import log_results

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
    try:
        return {"index": cmd_index, "run": cmd_run, "compare": cmd_compare, "log": cmd_log}[ns.cmd](ns)
    except OneGenError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: a finished index is kept; rerun the same command", file=sys.stderr)
        return 130
