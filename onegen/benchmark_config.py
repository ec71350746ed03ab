"""The benchmark's recipe (``configs/benchmark/*.yaml``): which real datasets, how they are split,
which model is trained on them and how it is evaluated.

The CPU recipe and the GPU one differ only in data paths, model and sizes: the stages they run are
the same (``onegen.benchmark``). Paths are relative to ``data_root`` (datasets) or to the checkout
(recipes); absolute paths are taken as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from onegen.errors import ConfigError
from onegen.methods import METHOD_NAMES

RAG_METHODS = list(METHOD_NAMES)  # the registry (onegen.methods)


@dataclass
class RagSet:
    name: str = field(default="", metadata={"help": "short name: directories, MLflow tags and table rows use it"})
    kind: Literal["hotpotqa", "2wiki"] = field(default="hotpotqa", metadata={"help": "input format"})
    input: str = field(default="", metadata={"help": "benchmark file, relative to data_root"})
    heldout_input: str | None = field(default=None, metadata={"help": "a separate held-out file (e.g. the official dev set); "
                                                                      "without it, `input` is split by question id"})
    heldout_fraction: float = field(default=0.2, metadata={"help": "share of `input`'s questions held out (split by a hash of the id)"})
    eval_examples: int = field(default=40, metadata={"help": "held-out questions evaluated per method (the first N of the held-out part)"})
    extra_train: list[str] = field(default_factory=list, metadata={
        "help": "more files of the same kind that only train (e.g. another split of the benchmark), relative to "
                "data_root; a record without its gold paragraphs in context is quarantined, and the summary checks "
                "that no evaluated question is among them"})
    train_weight: float = field(default=1.0, metadata={"help": "passes over its training parts in one training epoch "
                                                                "(data.train_weights of pipeline/train.py)"})


@dataclass
class ElSet:
    name: str = field(default="", metadata={"help": "short name (kore50, oke-2015, reuters-128)"})
    input: str = field(default="", metadata={"help": "ELEVANT benchmark JSONL, relative to data_root"})
    use: Literal["train", "eval", "split"] = field(default="eval", metadata={
        "help": "train: all its texts train; eval: all are evaluated (out of domain); split: by text id into both"})
    heldout_fraction: float = field(default=0.3, metadata={"help": "with use=split: share of the texts held out"})
    kb: str | None = field(default=None, metadata={"help": "an entity KB JSONL {id,name,description}; default: the "
                                                            "benchmark's own entities, names only"})
    eval_examples: int = field(default=0, metadata={"help": "texts (passages) evaluated; 0: all"})
    train_weight: float = field(default=1.0, metadata={"help": "passes over its training part in one training epoch "
                                                                "(data.train_weights of pipeline/train.py)"})


@dataclass
class TrainSpec:
    recipe: str = field(default="configs/smollm2-cpu.yaml", metadata={"help": "pipeline/train.py recipe (model, loss, optimiser)"})
    ranks: int = field(default=1, metadata={"help": "DeepSpeed ranks (torchrun processes)"})
    mode: Literal["onegen"] = field(default="onegen", metadata={"help": "training mode of the generator every method shares"})
    overrides: list[str] = field(default_factory=list, metadata={"help": "key=value overrides of the recipe (sizes, steps)"})


@dataclass
class EvalSpec:
    methods: list[str] = field(default_factory=lambda: list(RAG_METHODS), metadata={
        "help": "RAG methods, all with the one trained generator (the paper's Table 3: only the retriever differs)"})
    gen_batch_size: int = field(default=20, metadata={"help": "questions decoded together"})
    normalization: Literal["default", "official"] = field(default="default", metadata={
        "help": "EM/F1 normalisation: default (Unicode-aware) or official (the HotpotQA script's)"})
    max_new_tokens: int = field(default=64, metadata={"help": "most generated tokens per question"})
    pipeline_query: Literal["full", "latest", "lead"] = field(default="full", metadata={
        "help": "what the pipelines are queried with: full (question + all the model wrote), latest (question + "
                "what it wrote since the previous retrieval), lead (that alone)"})


@dataclass
class BenchmarkConfig:
    name: str = field(default="benchmark", metadata={"help": "MLflow experiment of every run"})
    data_root: str = field(default="../shared/data", metadata={"help": "where the benchmark files lie (relative to the checkout)"})
    seed: int = field(default=0, metadata={"help": "seed of the held-out split"})
    tokenizer: str = field(default="smollm2", metadata={"help": "tokenizer every dataset is prepared with (the model's)"})
    prep: list[str] = field(default_factory=list, metadata={"help": "key=value overrides of every data_prep run"})
    rag: list[RagSet] = field(default_factory=list, metadata={"help": "multi-hop QA datasets"})
    el: list[ElSet] = field(default_factory=list, metadata={"help": "entity-linking datasets"})
    train: TrainSpec = field(default_factory=TrainSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)

    def __post_init__(self) -> None:
        names = [s.name for s in [*self.rag, *self.el]]
        if any(not n for n in names):
            raise ConfigError("every dataset of rag/el needs a name")
        if len(set(names)) != len(names):
            raise ConfigError(f"dataset names must be unique, got {names}")
        bad = [m for m in self.eval.methods if m not in RAG_METHODS]
        if bad:
            raise ConfigError(f"eval.methods: unknown {bad}; choose from {RAG_METHODS}")
        if "onegen" not in self.eval.methods:
            raise ConfigError("eval.methods must include onegen (the bars compare against it)")
        if not any(s.use in ("train", "split") for s in self.el) and not self.rag:
            raise ConfigError("nothing to train on: give rag datasets or an el dataset with use train/split")


def resolve(path: str, base: Path) -> Path:
    p = Path(path)
    return p if p.is_absolute() else (base / p).resolve()
