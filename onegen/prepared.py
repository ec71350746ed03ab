"""The prepared-data contract: what ``data_prep`` writes and every later stage opens.

``open_prepared`` gives a ``PreparedData``: the memory-mapped query and document rows (``onegen.shards``,
checked against the manifest first) plus a doc-id lookup. ``read_output_manifest`` reads a stage output's
manifest with the newcomer's mistakes explained first (``not_an_output``: a training run given for its
``model/``, a raw benchmark file, a directory of several outputs). ``check_tokenizer`` refuses data
tokenised with another tokenizer than the one in hand (a different vocabulary would silently read wrong
ids): the manifest's tokenizer fingerprint must match. The trainer (``pipeline``) and ``evaluation``
both open prepared data through here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onegen.errors import ManifestMismatch
from onegen.manifest import MANIFEST_NAME, read_manifest
from onegen.shards import list_shards, load_shards, verify_shards
from onegen.tokens import tokenizer_fingerprint


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


# What each stage's output is, in words, and the command that writes one.
_WHAT = {"data_prep": "a prepared dataset", "train": "a model export", "index": "a document index",
         "eval": "evaluation results"}
_HOW = {"data_prep": "prepare one with `python -m data_prep prepare --kind KIND --input FILE --out DIR` "
                     "(or `python -m data_prep world --out DIR` for the synthetic world)",
        "train": "train one with pipeline/train.py: its model is OUTPUT_DIR/model"}


def _stage_of(d: Path) -> str | None:
    try:
        return json.loads((d / MANIFEST_NAME).read_text()).get("stage")
    except (OSError, ValueError, AttributeError):
        return None


def _outputs_below(d: Path, stage: str, depth: int = 2) -> list[Path]:
    """Directories under ``d`` (``depth`` levels) whose manifest is of ``stage``, sorted."""
    found, level = [], [d]
    for _ in range(depth):
        nxt = []
        for parent in level:
            try:
                children = sorted(c for c in parent.iterdir() if c.is_dir() and not c.name.startswith("."))
            except OSError:
                continue
            for c in children:
                (found if _stage_of(c) == stage else nxt).append(c)
        level = nxt
    return found


def _listing(paths: list[Path], limit: int = 6) -> str:
    return ", ".join(str(p) for p in paths[:limit]) + (", ..." if len(paths) > limit else "")


def not_an_output(path: str | Path, stage: str) -> str | None:
    """Why ``path`` is not the output of ``stage`` (``data_prep`` or ``train``), with the path to use.

    For the mistakes a newcomer makes: a path that does not exist, a training run given for its
    ``model/``, a raw ``.json`` benchmark file given for a prepared dataset, a directory that holds
    several outputs (the quickstart's ``world/``), another stage's output. None when ``path`` has a
    manifest of that stage, or looks like an interrupted run of it (``read_manifest`` says so)."""
    path = Path(path)
    what, how = _WHAT[stage], _HOW.get(stage, "")
    if path.is_file():
        if path.name in (MANIFEST_NAME, "onegen_config.json") or path.suffix == ".safetensors":
            return f"{path} is a file; give its directory, {path.parent}"
        if stage == "data_prep" and path.name.endswith((".json", ".jsonl", ".json.gz", ".jsonl.gz", ".gz")):
            return (f"{path} is a raw benchmark file, not {what} (a directory with manifest.json, queries/, docs/): "
                    f"prepare it first, e.g. `python -m data_prep prepare --kind hotpotqa --input {path} --out DIR`, "
                    f"and give DIR")
        return f"{path} is a file, not {what} (a directory with manifest.json); {how}"
    if not path.exists():
        parent = path.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        near = _outputs_below(parent, stage) if parent.exists() and parent != Path("/") else []
        hint = (f"; {what.split(' ', 1)[1]}s under {parent}: {_listing(near)}" if near else
                f" ({parent} is the nearest directory that exists); {how}" if parent != path.parent else f"; {how}")
        return f"{path} does not exist{hint}"
    have = _stage_of(path)
    if have == stage:
        return None
    if have is not None:
        return f"{path} is {_WHAT.get(have, f'the output of stage {have!r}')}, not {what}; {how}"
    if (path / MANIFEST_NAME).is_file():
        return None  # unreadable manifest: read_manifest says what is wrong with it
    if stage == "train" and (path / "model" / MANIFEST_NAME).is_file():
        return f"{path} is a training run; its model is {path / 'model'}"
    if stage == "data_prep" and (path / "model" / MANIFEST_NAME).is_file():
        return f"{path} is a training run (its model is {path / 'model'}), not {what}; {how}"
    if stage == "data_prep" and ((path / "queries").is_dir() or (path / "docs").is_dir()):
        return None  # an interrupted prep: read_manifest's message is the right one
    if stage == "train" and (path / "checkpoints").is_dir():
        return None  # a training run that has not exported its model yet: read_manifest's message
    inner = _outputs_below(path, stage)
    if inner:
        one = "its model is" if stage == "train" and len(inner) == 1 else f"it holds {what.split(' ', 1)[1]}s:"
        return f"{path} is not {what} itself; {one} {_listing(inner)}"
    return f"{path} has no {MANIFEST_NAME} and holds nothing onegen wrote: it is not {what}; {how}"


def read_output_manifest(path: str | Path, stage: str) -> dict:
    """``read_manifest`` with the newcomer's mistakes explained first (``not_an_output``)."""
    why = not_an_output(path, stage)
    if why:
        raise ManifestMismatch(why)
    return read_manifest(path, expect_stage=stage)


def open_prepared(path: str | Path) -> PreparedData:
    path = Path(path)
    manifest = read_output_manifest(path, "data_prep")
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
