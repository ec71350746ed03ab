"""Prepared datasets as the trainer sees them: memory-mapped rows plus a doc-id lookup.

The trainer refuses a prepared dataset whose tokenizer is not the model's (a different vocabulary
would silently train on wrong ids): the manifest's tokenizer fingerprint must match.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_prep.shards import list_shards, load_shards
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
