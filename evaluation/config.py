"""The evaluation stage's options: one typed config per command (``index``, ``run``, ``compare``).

Each option exists once, here: its type (a ``Literal`` lists the choices), its default and its help.
``python -m evaluation`` makes its flags from these fields (``onegen.config_flags``); a recipe
(``--config FILE``) and ``key=value`` arguments set the same fields, with the ``FILE:LINE, field``
errors of training and preparation, and ``--help-config`` lists them. Torch-free: ``--help`` reads it.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from onegen.methods import METHOD_NAMES

Dtype = Literal["auto", "fp32", "bf16", "fp16"]  # "auto" + onegen.devices.DTYPES (a test checks)
Attn = Literal["auto", "sdpa", "eager", "flash_attention_2"]  # "auto" + onegen.devices.ATTENTIONS
Normalization = Literal["default", "official"]  # evaluation.metrics implements them
PipelineQuery = Literal["full", "latest", "lead"]  # evaluation.retrievers.RetrievalStep.pipeline_query
Setting = Literal["distractor", "open"]
IndexKind = Literal["flat", "ivf", "ivfpq", "hnsw"]
MethodName = Literal[tuple(METHOD_NAMES)]  # type: ignore[valid-type]  (onegen.methods: the one registry)

NORMALIZATIONS: tuple[str, ...] = typing.get_args(Normalization)
PIPELINE_QUERIES: tuple[str, ...] = typing.get_args(PipelineQuery)
SETTINGS: tuple[str, ...] = typing.get_args(Setting)
DEFAULT_COMPARE_STORE = Path("runs") / "eval" / "mlflow.db"


def _opt(default: Any, help: str, **meta: Any) -> Any:
    return field(default=default, metadata={"help": help, **meta})


def _required(help: str) -> Any:
    return field(metadata={"help": help})


# Options of both `index` and `run` (each a factory: the field exists once, in both dataclasses)
def _dtype() -> Any:
    return _opt("auto", "model dtype; auto: bf16 on a CUDA GPU that supports it, else fp32 (on CPU fp32)")


def _attn() -> Any:
    return _opt("auto", "attention kernel; auto: flash_attention_2 on CUDA with bf16/fp16 when flash-attn is installed, "
                        "else sdpa (flash_attention_2 needs bf16/fp16 and CUDA). The resolved dtype and attention are "
                        "printed, written in the index manifest and logged as MLflow params; an index built in "
                        "another precision is rebuilt, not reused")


@dataclass
class IndexParams:
    """faiss parameters: of the approximate kinds at build and search time, and of GPU storage."""

    nlist: int | None = _opt(None, "ivf/ivfpq: inverted lists (default: round(sqrt(N)))")
    nprobe: int | None = _opt(None, "ivf/ivfpq: lists visited per search (default: max(8, nlist // 8); given at "
                                    "search time, it overrides the index's own)")
    pq_m: int | None = _opt(None, "ivfpq: sub-quantizers of 8 bits = bytes per vector; must divide the dimension "
                                  "(default: dimension / 4)")
    refine: int = _opt(8, "ivfpq: candidates per result, re-scored exactly from the stored vectors (1: PQ scores only)")
    hnsw_m: int = _opt(32, "hnsw: neighbours per node")
    ef_search: int | None = _opt(None, "hnsw: search breadth (default 128; given at search time, it overrides the "
                                       "index's own)")
    faiss_fp16: bool = _opt(False, "GPU faiss: hold a flat index's vectors in fp16 on the GPUs (half the memory, "
                                   "scores to ~1e-3). On several GPUs the index is sharded (each holds 1/n) either way")


def _faiss() -> Any:
    return field(default_factory=IndexParams, metadata={"flat": True, "help": "faiss parameters (flags of their own)"})


def _device() -> Any:
    return _opt(None, "cpu / cuda (default: cuda when available)")


def _progress() -> Any:
    return _opt(True, "progress bars (flag --quiet: none)", flags=("--quiet",), flag_help="no progress bars")


@dataclass
class IndexConfig:
    """``evaluation index``: encode a prepared dataset's documents with a checkpoint into a faiss index."""

    model: Path = _required("exported checkpoint dir (pipeline/train.py OUTPUT/model)")
    data: Path = _required("prepared dataset dir (data_prep output)")
    out: Path = _required("index dir to write")
    kind: IndexKind = _opt("flat", "flat: exact inner product; ivf, ivfpq (product-quantised) and hnsw: approximate, "
                                   "for large pools")
    batch_size: int = _opt(64, "documents per forward (sorted by length first)")
    rows: int | None = _opt(None, "encode only the documents the first N query rows can retrieve in the distractor "
                                  "setting (their candidates + gold positives): a subset index, recorded in its "
                                  "manifest and used only by runs over at most N rows (default: every document)")
    device: str | None = _device()
    dtype: Dtype = _dtype()
    attn: Attn = _attn()
    faiss: IndexParams = _faiss()
    shard: str | None = _opt(None, "I/N: encode only slice I (0-based) of N of the documents into OUT.shards/ and "
                                   "stop, then --merge N; 'array': this task of a SLURM job array (under torchrun "
                                   "every rank takes its own slice and rank 0 merges, with no flag)")
    merge: int | None = _opt(None, "N: merge the N shards of OUT.shards/ (after every --shard I/N task) into the index")
    force: bool = _opt(False, "rebuild even if a complete index is there")
    progress: bool = _progress()


@dataclass
class RunConfig:
    """``evaluation run``: one method on one prepared dataset -> a results dir and an MLflow run."""

    model: Path = _required("exported checkpoint dir")
    data: Path = _required("prepared dataset dir (its manifest says rag or el)")
    method: MethodName = _opt("onegen", "retrieval method (the list above)")
    index: Path | None = _opt(None, "index dir built by `index` for this checkpoint + data (default: built into "
                                    "RESULTS_DIR/index when the method needs one)")
    out: Path | None = _opt(None, "RESULTS_DIR (default runs/eval/<dataset>-<method>-<model>)")
    setting: Setting = _opt("distractor", "distractor: rank each question's own candidate paragraphs; open: the "
                                          "whole pool")
    max_examples: int | None = _opt(None, "evaluate only the first N rows")
    kind: IndexKind = _opt("flat", "kind of an index built on the fly")
    max_new_tokens: int | None = _opt(None, "most generated tokens per question (default: RAG 64; EL 2 x text "
                                            "tokens + 16)")
    max_hops: int = _opt(4, "most retrievals per question (RAG)")
    k: int = _opt(5, "documents retrieved per query (top-1 inserted; recall@k)")
    force_retrieval_every: int | None = _opt(None, "insert [RQ] after every N generated tokens instead of letting "
                                                   "the model decide (smoke tests of an untrained checkpoint; not a "
                                                   "benchmark setting)")
    pipeline_query: PipelineQuery = _opt("full", "pipelines' query at each [RQ]: full = question + all the model "
                                                 "wrote; latest = question + what it wrote since the previous "
                                                 "retrieval; lead = that alone (full still names hop 1 at hop 2)")
    normalization: Normalization = _opt("default", "answer normalisation of EM/F1. default: the HotpotQA rules "
                                                   "(lower-case, delete punctuation, drop a/an/the, collapse "
                                                   "whitespace) plus NFC and Unicode punctuation (O’Brien == "
                                                   "O'Brien). official: exactly the official HotpotQA script "
                                                   "(ASCII string.punctuation only, no NFC), for numbers comparable with "
                                                   "published ones")
    batch_size: int = _opt(32, "rows per forward of the teacher-forced pass")
    device: str | None = _device()
    dtype: Dtype = _dtype()
    attn: Attn = _attn()
    faiss: IndexParams = _faiss()
    gen_batch_size: int = _opt(1, "questions (RAG) or texts (EL) decoded together, one batched forward per step "
                                  "(same outputs, more per second; s/question is then a throughput, not a latency)")
    tracking: bool = _opt(True, "log an MLflow run (flag --no-mlflow: results on disk only)", flags=("--no-mlflow",),
                          flag_help="write results to disk only, no MLflow run (`evaluation log` logs it later)")
    tracking_uri: str | None = _opt(None, "MLflow tracking URI, or 'train' for the training run's store (default "
                                          "$MLFLOW_TRACKING_URI, else sqlite:///<RESULTS_DIR>/../mlflow.db)")
    experiment: str = _opt("onegen", "MLflow experiment")
    run_name: str | None = _opt(None, "MLflow run name (default <method>:<dataset>:<model>)")
    shard: str | None = _opt(None, "I/N: decode only slice I (0-based) of N of the rows into RESULTS_DIR.shards/ and stop "
                                   "(needs --index when the method uses one), then --merge N; 'array': this task of a "
                                   "SLURM job array; under torchrun every rank takes its own slice and rank 0 merges, "
                                   "with no flag")
    merge: int | None = _opt(None, "N: score the N shards of RESULTS_DIR.shards/ as one run (one predictions file, "
                                   "metrics.json and MLflow run)")
    progress: bool = _progress()
    extra_params: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "more MLflow params of the run, logged as extra.<key> (a recipe or key=value only)"})


@dataclass
class CompareConfig:
    """``evaluation compare``: the eval runs of an MLflow experiment side by side."""

    experiment: str = _opt("onegen", "MLflow experiment")
    tracking_uri: str | None = _opt(None, f"MLflow tracking URI (default $MLFLOW_TRACKING_URI, else "
                                          f"sqlite:///{DEFAULT_COMPARE_STORE})")
    out: Path = _opt(Path("runs") / "eval" / "compare.png", "PNG path; .csv and .md are written beside it")
    all: bool = _opt(False, "every run, not only the latest per method/model/dataset")
    models: list[str] = field(default_factory=list, metadata={"help": (
        "only the eval runs of these checkpoints (model dirs, matched by their manifest fingerprint): runs of an "
        "older model in the same experiment are left out")})
