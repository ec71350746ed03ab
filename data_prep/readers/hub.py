"""Load a benchmark from the Hugging Face hub with ``datasets`` and convert it to our records.

Network access is opt-in: ``load_from_hub`` refuses unless ``allow_network=True`` (the CLI's
``--from-hub``), so nothing downloads by accident in tests or on an offline cluster node.

Hub copies of HotpotQA (``hotpotqa/hotpot_qa``, configs ``distractor``/``fullwiki``) store
``supporting_facts`` and ``context`` column-wise (``{"title": [...], "sent_id": [...]}``,
``{"title": [...], "sentences": [...]}``) and call the id ``id``; ``hub_row_to_record`` turns such a
row back into the original layout so the file readers' validation applies unchanged. A name that
contains "2wiki" is parsed as 2WikiMultihopQA, anything else as HotpotQA.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from onegen.errors import OneGenError

from ..records import Dataset
from .errors import ErrorPolicy, resolve_policy
from .hotpotqa import ParsedMultiHop, build_multihop_dataset, parse_multihop_record
from .jsonio import RawRecord
from .twowiki import parse_twowiki_record

DEFAULT_CONFIGS = {"hotpotqa/hotpot_qa": "distractor", "hotpot_qa": "distractor"}


class NetworkRefused(OneGenError):
    """A hub download was requested without ``allow_network=True``."""


def _columns_to_pairs(value: Any, keys: tuple[str, str]) -> Any:
    """``{"title": [...], "sentences": [...]}`` → ``[[title, sentences], ...]``; anything else unchanged."""
    if isinstance(value, dict) and all(k in value for k in keys):
        a, b = value[keys[0]], value[keys[1]]
        if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            return [[x, y] for x, y in zip(a, b)]
    return value


def hub_row_to_record(row: dict[str, Any]) -> dict[str, Any]:
    """A hub row in the original HotpotQA/2Wiki layout (column-wise fields zipped back, ``id`` → ``_id``)."""
    record = dict(row)
    if "_id" not in record and "id" in record:
        record["_id"] = record.pop("id")
    record["supporting_facts"] = _columns_to_pairs(record.get("supporting_facts"), ("title", "sent_id"))
    context = record.get("context")
    for sentences_key in ("sentences", "content"):
        context = _columns_to_pairs(context, ("title", sentences_key))
    record["context"] = context
    if isinstance(record.get("evidences"), list):
        record["evidences"] = [list(e) if isinstance(e, (list, tuple)) else e for e in record["evidences"]]
    return {k: v for k, v in record.items() if v is not None or k == "answer_id"}


def dataset_from_rows(
    rows: Iterable[dict[str, Any]],
    origin: str,
    policy: ErrorPolicy | None = None,
    *,
    kind: str = "hotpotqa",
    require_gold_in_context: bool = True,
) -> Dataset:
    """Convert hub rows (any iterable of dicts, e.g. a ``datasets.Dataset``); ``origin`` names them in errors."""
    policy = resolve_policy(policy)
    records = (RawRecord(hub_row_to_record(row), origin, i + 1, where="row") for i, row in enumerate(rows))
    if kind == "2wiki":

        def parse(rec: RawRecord) -> ParsedMultiHop:
            return parse_twowiki_record(rec, None, require_gold_in_context=require_gold_in_context)
    else:

        def parse(rec: RawRecord) -> ParsedMultiHop:
            return parse_multihop_record(rec, require_gold_in_context=require_gold_in_context)

    return build_multihop_dataset(records, parse, policy, source=kind)


def load_from_hub(
    name: str,
    split: str,
    cache_dir: str | Path | None,
    allow_network: bool,
    *,
    config: str | None = None,
    policy: ErrorPolicy | None = None,
    require_gold_in_context: bool = True,
) -> Dataset:
    """Download (or reuse from ``cache_dir``) ``name``/``split`` with ``datasets.load_dataset`` and convert it."""
    if not allow_network:
        raise NetworkRefused(
            f"refusing to load {name!r} from the Hugging Face hub: network access is off. "
            "Pass allow_network=True (CLI: --from-hub) to download it, or give a local file instead."
        )
    import datasets  # imported here: the refusal above must not depend on it

    config = config or DEFAULT_CONFIGS.get(name)
    hub = datasets.load_dataset(name, config, split=split, cache_dir=str(cache_dir) if cache_dir else None)
    kind = "2wiki" if "2wiki" in name.lower() else "hotpotqa"
    origin = f"hub:{name}" + (f"/{config}" if config else "") + f"[{split}]"
    return dataset_from_rows(hub, origin, policy, kind=kind, require_gold_in_context=require_gold_in_context)
