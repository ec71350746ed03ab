"""The trainer's typed config (one YAML recipe in ``configs/``, overridable with ``key=value``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from onegen.config import FieldError


# The projections of Llama, Qwen2 and Mistral blocks (attention and MLP): LoRA's usual targets there.
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraConfig:
    """``model.lora``: low-rank adapters (peft) on the frozen base; the special tokens' rows still train."""

    enabled: bool = field(default=False, metadata={"help": "train LoRA adapters instead of every weight; the new special tokens' embedding and LM-head rows (only those rows) train too"})
    r: int = field(default=16, metadata={"help": "adapter rank"})
    alpha: float = field(default=32.0, metadata={"help": "adapter scale numerator (scale = alpha / r)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapters' input; > 0 keeps a copy of every adapted projection's input for backward (SmolLM2-135M, 4x256 tokens: saved activations 1.74 -> 2.60 GB at 0.05)"})
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS), metadata={"help": "module names that get adapters (default: every attention and MLP projection of Llama/Qwen2/Mistral)"})
    export_adapter: bool = field(default=False, metadata={"help": "also export the adapter alone (peft format, its base named) beside the merged model"})

    def __post_init__(self) -> None:
        if self.r < 1:
            raise FieldError("model.lora.r", f"expected >= 1, got {self.r}")
        if not 0 <= self.dropout < 1:
            raise FieldError("model.lora.dropout", f"expected a number in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise FieldError("model.lora.target_modules", "expected at least one module name")


@dataclass
class ModelConfig:
    source: str = field(default="tiny", metadata={"help": "tiny (a Llama built from the fields below), smollm2 (offline GGUF), a local HF dir, or a hub name with allow_network"})
    architecture: Literal["llama", "qwen2", "mistral"] = field(default="llama", metadata={"help": "family of the tiny model built from a config"})
    hidden_size: int = field(default=128, metadata={"help": "tiny model: hidden size"})
    intermediate_size: int = field(default=384, metadata={"help": "tiny model: MLP size"})
    num_layers: int = field(default=4, metadata={"help": "tiny model: layers"})
    num_heads: int = field(default=4, metadata={"help": "tiny model: attention heads"})
    num_key_value_heads: int = field(default=0, metadata={"help": "tiny model: key/value heads for grouped-query attention (0: num_heads; Qwen2-1.5B has 2)"})
    vocab_size: int = field(default=0, metadata={"help": "tiny model: embedding rows (0: the tokenizer's length; more pads the matrix past the vocabulary, as Qwen2 does)"})
    max_position_embeddings: int = field(default=1024, metadata={"help": "tiny model: max positions"})
    tie_word_embeddings: bool = field(default=False, metadata={"help": "tiny model: tie input embeddings and LM head"})
    allow_network: bool = field(default=False, metadata={"help": "allow loading the model from the Hugging Face hub"})
    trust_remote_code: bool = field(default=False, metadata={"help": "run model code shipped with the checkpoint (off unless you trust it)"})
    attn_implementation: str = field(default="auto", metadata={"help": "auto (flash_attention_2 with CUDA + flash-attn, else sdpa), sdpa, eager, flash_attention_2"})
    dtype: Literal["auto", "fp32", "bf16"] = field(default="auto", metadata={"help": "auto: bf16 on a GPU that supports it, else fp32 (flash-attn needs bf16)"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward to save memory"})
    lora: LoraConfig = field(default_factory=LoraConfig)
    train_layers: int = field(default=0, metadata={"help": "train only the top N transformer blocks, the final norm and the LM head (with tied embeddings, the embedding through it); nothing below block L-N records a graph, so backward costs N/L of a full one (0: train everything)"})

    def __post_init__(self) -> None:  # before any rank starts: two ways of choosing what trains
        if self.lora.enabled and self.train_layers:
            raise FieldError("model.lora.enabled", f"cannot be combined with model.train_layers={self.train_layers}: "
                             "LoRA trains adapters on every targeted layer; set one of them")


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=list, metadata={"help": "prepared dataset dirs (data_prep output) to train on, mixed"})
    train_weights: list[float] = field(default_factory=list, metadata={"help": "one per data.train dir: passes over it in one epoch (2: twice, each pass its own shuffle; 0.5: half its rows; 0: left out). Empty: 1 each"})
    eval: list[str] = field(default_factory=list, metadata={"help": "prepared dataset dirs for the periodic teacher-forced evaluation"})
    eval_max_rows: int = field(default=200, metadata={"help": "rows of each eval set used by the periodic evaluation"})
    packing: bool = field(default=False, metadata={"help": "padding-free batches: the rows of a micro-batch (query rows, and separately document rows) are packed into long sequences with per-row position_ids, so no token attends across rows (flash-attn varlen on GPU, a block-diagonal causal mask with sdpa/eager)"})
    pack_tokens: int = field(default=0, metadata={"help": "packing: most tokens in one packed sequence (rows binned first-fit by length). 0: automatic: with flash-attn one sequence per micro-batch side (varlen); with sdpa/eager, whose dense block-diagonal mask costs the square of the packed length, each side's bin size is chosen per batch among 1-2x its longest row by the padding and attention it costs (pipeline/packing.py)"})
    eval_max_candidates: int = field(default=2000, metadata={"help": "entity linking: KB entries the periodic evaluation ranks against (the rows' positives + a seeded sample); a larger KB is sampled and the metric is then named retrieval_acc@N"})

    def __post_init__(self) -> None:
        if not self.train_weights:
            return
        if len(self.train_weights) != len(self.train):
            raise FieldError("data.train_weights", f"needs one weight per data.train dir ({len(self.train)}), "
                                                   f"got {len(self.train_weights)}")
        if any(w < 0 for w in self.train_weights) or not any(w > 0 for w in self.train_weights):
            raise FieldError("data.train_weights", f"weights must be >= 0 and one > 0, got {self.train_weights}")


LossMode = Literal["onegen", "git", "rit", "grit"]
RetLoss = Literal["bpr", "infonce"]
MODES: tuple[str, ...] = get_args(LossMode)
RET_LOSSES: tuple[str, ...] = get_args(RetLoss)


@dataclass
class LossConfig:
    """The recipe's ``loss`` section, and what the joint loss itself takes (``pipeline.forward``): one class."""

    mode: LossMode = field(default="onegen", metadata={"help": "onegen: both in one sequence; git: generation only; rit: retrieval only; grit: both, never in one sequence"})
    lambda_gen: float = field(default=1.0, metadata={"help": "weight of the generation loss"})
    lambda_ret: float = field(default=1.0, metadata={"help": "weight of the retrieval loss"})
    ret_loss: RetLoss = field(default="bpr", metadata={"help": "bpr (paper default) or infonce over the global batch"})
    temperature: float = field(default=0.02, metadata={"help": "InfoNCE temperature"})
    num_negatives: int = field(default=2, metadata={"help": "hard negatives sampled per RET token per epoch"})
    grad_cache: bool = field(default=False, metadata={"help": "gradient caching for the retrieval loss: embeddings first without a graph, the loss and its embedding gradients over the global batch, then each chunk re-run with a graph and back-propagated; peak memory follows the chunk, not the contrastive batch"})
    grad_cache_chunk: int = field(default=4, metadata={"help": "grad_cache: rows (query rows, document rows; packed: packed sequences) per re-run chunk"})

    def __post_init__(self) -> None:  # a recipe's types are checked on load; this also guards direct construction
        if self.mode not in MODES:
            raise FieldError("loss.mode", f"expected one of {list(MODES)}, got {self.mode!r}")
        if self.ret_loss not in RET_LOSSES:
            raise FieldError("loss.ret_loss", f"expected one of {list(RET_LOSSES)}, got {self.ret_loss!r}")
        if self.temperature <= 0:
            raise FieldError("loss.temperature", f"must be > 0, got {self.temperature}")
        if self.grad_cache_chunk < 1:
            raise FieldError("loss.grad_cache_chunk", f"expected >= 1, got {self.grad_cache_chunk}")

    @property
    def uses_gen(self) -> bool:
        return self.mode != "rit"

    @property
    def uses_ret(self) -> bool:
        return self.mode != "git"

    def effective_lambdas(self) -> tuple[float, float]:
        """(λg, λr) after the mode: git forces λr = 0, rit forces λg = 0."""
        return (self.lambda_gen if self.uses_gen else 0.0, self.lambda_ret if self.uses_ret else 0.0)


@dataclass
class OptimConfig:
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95], metadata={"help": "AdamW betas (the OneGen reference: [0.9, 0.999])"})
    epochs: float = field(default=0.0, metadata={"help": "passes over the training rows; > 0 derives max_steps from the data size, world size and batch (0: use max_steps)"})
    warmup_steps: int = field(default=20, metadata={"help": "linear warmup steps"})
    max_steps: int = field(default=200, metadata={"help": "optimizer steps to train (the run ends there)"})
    micro_batch_size: int = field(default=8, metadata={"help": "query rows per rank per micro-step"})
    grad_accum: int = field(default=1, metadata={"help": "micro-steps per optimizer step"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient norm clipping"})


@dataclass
class TrainConfig:
    output_dir: str = field(default="runs/train", metadata={"help": "checkpoints, exported model, logs"})
    seed: int = field(default=0, metadata={"help": "seed of weights (tiny), data order and negatives"})
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: str = field(default="ds_configs/zero3.json", metadata={"help": "DeepSpeed JSON config; trainer-known values are 'auto'"})
    checkpoint_every: int = field(default=50, metadata={"help": "save a resumable DeepSpeed checkpoint every N steps (0: only at the end or when stopped)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "complete checkpoints kept (older ones deleted)"})
    eval_every: int = field(default=0, metadata={"help": "teacher-forced evaluation every N steps (0: only at the end)"})
    log_every: int = field(default=1, metadata={"help": "log metrics every N steps"})
    mlflow_tracking_uri: str | None = field(default=None, metadata={"help": "MLflow server URI; default a sqlite store under output_dir"})
    mlflow_experiment: str = field(default="onegen", metadata={"help": "MLflow experiment name"})
    run_name: str | None = field(default=None, metadata={"help": "MLflow run name (default: mode + model)"})
    export: bool = field(default=True, metadata={"help": "export an HF-loadable model at the end"})

    def __post_init__(self) -> None:
        if self.model.train_layers < 0:
            raise FieldError("model.train_layers", f"expected >= 0 (0: every layer), got {self.model.train_layers}")
        if len(self.optim.betas) != 2 or not all(0 <= b < 1 for b in self.optim.betas):
            raise FieldError("optim.betas", f"expected two numbers in [0, 1), got {self.optim.betas}")
        if self.data.pack_tokens < 0:
            raise FieldError("data.pack_tokens", f"expected >= 0 (0: chosen by the attention kernel), got {self.data.pack_tokens}")
        if self.optim.epochs < 0:
            raise FieldError("optim.epochs", f"expected >= 0 (0: use max_steps), got {self.optim.epochs}")
        for name in ("checkpoint_every", "eval_every"):
            if getattr(self, name) < 0:
                raise FieldError(name, f"expected >= 0 (0 turns it off), got {getattr(self, name)}")
        for name in ("keep_checkpoints", "log_every"):
            if getattr(self, name) < 1:
                raise FieldError(name, f"expected >= 1, got {getattr(self, name)}")
