"""Prepared datasets as the trainer sees them: memory-mapped rows plus a doc-id lookup.

The trainer refuses a prepared dataset whose tokenizer is not the model's (a different vocabulary
would silently train on wrong ids): the manifest's tokenizer fingerprint must match.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_prep.shards import list_shards, load_shards, verify_shards
from data_prep.tokenizer import tokenizer_fingerprint
from onegen.errors import ManifestMismatch
from onegen.manifest import read_manifest


@dataclass
class PreparedData:
    path: Path
    manifest: dict
    queries: Any  # datasets.Dataset (memory-mapped)
    docs: Any
    doc_index: dict[str, int]

    @property
    def task(self) -> str:
        return self.manifest["task"]

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    def __len__(self) -> int:
        return len(self.queries)

    def query_rows(self, indices: list[int]) -> list[dict]:
        batch = self.queries[indices]  # one columnar read, then rows
        keys = list(batch)
        return [{k: batch[k][i] for k in keys} for i in range(len(indices))]

    def doc_rows(self, doc_ids: list[str]) -> list[dict]:
        try:
            idx = [self.doc_index[d] for d in doc_ids]
        except KeyError as e:
            raise ManifestMismatch(f"{self.path}: a query refers to document {e.args[0]!r} that docs/ does not hold") from None
        if not idx:
            return []
        batch = self.docs.select_columns(["doc_id", "input_ids", "roles"])[idx]
        return [{"doc_id": batch["doc_id"][i], "input_ids": batch["input_ids"][i], "roles": batch["roles"][i]}
                for i in range(len(idx))]


def open_prepared(path: str | Path) -> PreparedData:
    path = Path(path)
    manifest = read_manifest(path, expect_stage="data_prep")
    missing = [k for k in ("fingerprint", "task", "counts", "tokenizer", "config") if k not in manifest]
    if missing:
        raise ManifestMismatch(f"{path}/manifest.json lacks {', '.join(missing)}: not a manifest this version of "
                               f"data_prep writes; prepare the dataset again")
    verify_shards(path, manifest)
    queries = load_shards(list_shards(path / "queries"))
    docs = load_shards(list_shards(path / "docs"))
    expected = manifest["counts"]
    if len(queries) != expected["queries"] or len(docs) != expected["docs"]:
        raise ManifestMismatch(f"{path}: shards hold {len(queries)} queries / {len(docs)} docs but the manifest says "
                               f"{expected['queries']} / {expected['docs']}; the directory was modified after prep")
    doc_index = {d: i for i, d in enumerate(docs["doc_id"])}
    return PreparedData(path, manifest, queries, docs, doc_index)


def check_tokenizer(data: PreparedData, tokenizer: Any, what: str) -> None:
    want = data.manifest["tokenizer"]["fingerprint"]
    have = tokenizer_fingerprint(tokenizer)
    if want != have:
        raise ManifestMismatch(
            f"{data.path} was tokenised with another tokenizer (fingerprint {want[:12]}) than {what} "
            f"({have[:12]}); prepare the data with this model's tokenizer (data_prep --tokenizer <model dir>)"
        )


_TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_model_tokenizer(model_dir: str | Path, tokenizer: Any, tokens: Any = None) -> None:
    """A pretrained ``model.source`` must be trained on data tokenised with *its* tokenizer.

    The trainer takes its tokenizer from the prepared data; a model whose own vocabulary differs
    would silently read every id as another token. ``tokenizer`` is the data's (with the OneGen
    special tokens); the model dir's tokenizer gets the same special tokens added, then the two
    vocabularies must be equal. A dir without tokenizer files cannot be checked and is let through.
    """
    from transformers import AutoTokenizer

    from onegen.tokens import add_special_tokens

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
