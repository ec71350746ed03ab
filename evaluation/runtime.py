"""A loaded checkpoint ready for inference: model, tokenizer, tagger, special-token ids, documents.

Everything evaluation needs from a model export (``pipeline.export`` writes it, ``onegen.model_io`` loads it) and a prepared dataset
(``data_prep``), loaded once and checked against each other: the dataset must have been tokenised
with the model's tokenizer and must use the same special-token ids, else ``ManifestMismatch``.

The tagger (the *same* ``data_prep.tagging.Tagger`` that built the training rows) is configured
with the prepared dataset's templates, so inference inserts ``<paragraph>…</paragraph>`` exactly as
the rows of that dataset do; without a dataset, the templates recorded in the model's
``onegen_config.json`` (those of its training data) are used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from data_prep.records import Document
from data_prep.tagging import Tagger, TaggingConfig
from evaluation.checks import check_data_for_model, model_manifest, onegen_config  # noqa: F401 (model_manifest re-exported)
from evaluation.precision import Precision, dtype_name, resolve_precision
from onegen.config import from_dict
from onegen.devices import default_device  # noqa: F401 (re-exported: bench and older callers import it from here)
from onegen.errors import ManifestMismatch
from onegen.hidden import decoder_of
from onegen.model_io import load_model
from onegen.prepared import PreparedData
from onegen.tokens import SpecialTokens


def check_compatible(model_dir: str | Path, data: PreparedData) -> None:
    """Refuse a prepared dataset tokenised differently from the model (ids would silently be wrong)."""
    check_data_for_model(model_dir, data.path, data.manifest)


def tagger_for(tokenizer: Any, onegen_cfg: dict, data: PreparedData | None = None) -> Tagger:
    """The tagger with the dataset's templates (or, without a dataset, the model's training templates)."""
    if data is not None and "tagging" in data.manifest.get("config", {}):
        templates = data.manifest["config"]["tagging"]
        tokens = data.manifest["config"].get("tokens") or onegen_cfg["special_tokens"]
    else:
        templates = onegen_cfg.get("templates") or {}
        tokens = onegen_cfg["special_tokens"]
    cfg = from_dict(TaggingConfig, templates, where="templates")
    special = SpecialTokens.from_dict(tokens)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in special.all_tokens()}
    return Tagger(tokenizer, special, ids, cfg)


class DocStore:
    """``doc_id -> Document`` over a prepared dataset's ``docs/`` (read lazily, memory-mapped)."""

    def __init__(self, data: PreparedData) -> None:
        self.data = data
        self._cols = data.docs.select_columns(["doc_id", "title", "text"])

    def __contains__(self, doc_id: str) -> bool:
        return doc_id in self.data.doc_index

    def __len__(self) -> int:
        return len(self.data.doc_index)

    def get(self, doc_id: str) -> Document:
        try:
            row = self._cols[self.data.doc_index[doc_id]]
        except KeyError:
            raise ManifestMismatch(f"document {doc_id!r} is not in {self.data.path}/docs") from None
        return Document(row["doc_id"], row["title"], row["text"])

    def all(self) -> list[Document]:
        cols = self._cols[:]
        return [Document(d, t, x) for d, t, x in zip(cols["doc_id"], cols["title"], cols["text"])]


@dataclass
class Runtime:
    """A checkpoint loaded for inference (one per process; share it between retrievers and loops)."""

    model_dir: Path
    model: torch.nn.Module
    tokenizer: Any
    tagger: Tagger
    onegen_config: dict
    manifest: dict
    docs: DocStore | None = None
    data: PreparedData | None = None
    ids: dict[str, int] = field(default_factory=dict)  # key ("rq", "lk", ...) -> token id
    precision: Precision | None = None

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def decoder(self) -> torch.nn.Module:
        return decoder_of(self.model)

    @property
    def eos_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else self.tokenizer.eos_token_id)

    def precision_record(self) -> dict[str, str]:
        """dtype / attention / device as the index manifest and MLflow record them (read off the model
        when the runtime was built by hand, without :func:`load_runtime`)."""
        if self.precision is not None:
            return self.precision.record()
        p = next(self.model.parameters())
        attn = getattr(self.model.config, "_attn_implementation", None) or "sdpa"
        return {"dtype": dtype_name(p.dtype), "attn": str(attn),
                "attn_reason": "read off the loaded model", "device": str(p.device)}

    @property
    def max_positions(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 1 << 30))


def row_groups(data: PreparedData, indices: Sequence[int], size: int) -> Iterator[list[dict]]:
    """The query rows at ``indices``, ``size`` at a time (read from the shards in chunks of >= 64)."""
    chunk = max(64, size)
    for s in range(0, len(indices), chunk):
        rows = data.query_rows(list(indices[s:s + chunk]))
        for g in range(0, len(rows), size):
            yield rows[g:g + size]


def load_runtime(model_dir: str | Path, data: PreparedData | None = None, *, device: str | None = None,
                 dtype: str | torch.dtype = "auto", attn: str = "auto") -> Runtime:
    """Load an exported checkpoint (and check it against ``data`` when given).

    ``dtype`` (auto/fp32/bf16/fp16) and ``attn`` (auto/sdpa/eager/flash_attention_2): see
    :func:`resolve_precision`; on CPU ``auto`` is fp32 + sdpa.
    """
    model_dir = Path(model_dir)
    prec = resolve_precision(device, dtype, attn)  # refuses an impossible choice before any loading
    man = model_manifest(model_dir)
    ocfg = onegen_config(model_dir)
    if data is not None:
        check_compatible(model_dir, data)
    model, tokenizer = load_model(model_dir, device=prec.device, dtype=prec.dtype, attn_implementation=prec.attn)
    tagger = tagger_for(tokenizer, ocfg, data)
    ids = {k: tagger.tid(k) for k in SpecialTokens.KEYS}
    return Runtime(model_dir, model, tokenizer, tagger, ocfg, man, DocStore(data) if data is not None else None, data, ids,
                   prec)
