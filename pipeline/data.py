"""Prepared datasets as the trainer sees them, and the trainer's check of a pretrained model's tokenizer.

The prepared-data contract itself (``PreparedData``, ``open_prepared``, ``read_output_manifest``,
``not_an_output``, ``check_tokenizer``) lives in ``onegen.prepared``, shared with evaluation; it is
re-exported here for the trainer's callers and the tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from onegen.errors import ManifestMismatch
from onegen.prepared import PreparedData, check_tokenizer, not_an_output, open_prepared, read_output_manifest
from onegen.tokens import add_special_tokens, tokenizer_fingerprint

__all__ = ["PreparedData", "check_model_tokenizer", "check_tokenizer", "not_an_output", "open_prepared",
           "read_output_manifest"]

_TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_model_tokenizer(model_dir: str | Path, tokenizer: Any, tokens: Any = None) -> None:
    """A pretrained ``model.source`` must be trained on data tokenised with *its* tokenizer.

    The trainer takes its tokenizer from the prepared data; a model whose own vocabulary differs
    would silently read every id as another token. ``tokenizer`` is the data's (with the OneGen
    special tokens); the model dir's tokenizer gets the same special tokens added, then the two
    vocabularies must be equal. A dir without tokenizer files cannot be checked and is let through.
    """
    # heavy (transformers): imported only when a pretrained model's tokenizer is checked
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    if not any((model_dir / m).is_file() for m in _TOKENIZER_MARKERS):
        return
    own = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    if tokens is not None:
        add_special_tokens(own, tokens)
    have, want = tokenizer.get_vocab(), own.get_vocab()
    if have == want:
        return
    data_dir = Path(getattr(tokenizer, "name_or_path", "") or "?")
    data_dir = data_dir.parent if data_dir.name == "tokenizer" else data_dir
    raise ManifestMismatch(
        f"{data_dir} was tokenised with another tokenizer ({len(have)} tokens, fingerprint "
        f"{tokenizer_fingerprint(tokenizer)[:12]}) than model.source {model_dir} ({len(want)} tokens, "
        f"{tokenizer_fingerprint(own)[:12]}); prepare the data with the model's tokenizer "
        f"(python -m data_prep prepare ... --tokenizer {model_dir})"
    )
