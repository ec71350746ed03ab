"""Sharded evaluation runs: N processes each decode a disjoint slice of the questions (or texts); the
merge scores all of them as one run.

Shard I of N decodes rows ``range(n)[slice I]`` (``evaluation.sharding``) and writes, into
``RESULTS_DIR.shards/shard-I-of-N/``, its *raw* output before any scoring (``evaluation.tasks.Raw``:
each row's result as ``predictions.jsonl`` records it, teacher-forced hit counts per hop, the
seconds spent) with a manifest naming what it is a part of: checkpoint, data, index, method and
every option that changes a decoded token. The merge checks the shards agree with each other and
with its own request, concatenates them in shard order and scores them with the one-process code
(``tasks.rag_finish`` / ``el_finish``): predictions, metrics.json, plots, the manifest and one
MLflow run, the same as a one-process run over the same rows (timings aside: ``s_per_question`` is
then the shards' generation seconds added up, per question).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from evaluation.config import RunConfig
from evaluation.index import staged_dir
from evaluation.sharding import complete_manifest, shard_dir, shard_slice, shards_dir
from evaluation.tasks import Raw, json_default
from onegen.errors import ConfigError, ManifestMismatch
from onegen.manifest import fingerprint_files, write_manifest

STAGE = "eval-shard"
RAW = "raw.json"
FILES = (RAW,)
# The options that change what a row decodes into (or how it is counted): shards and merge must agree.
DECODING = ("method", "setting", "max_new_tokens", "max_hops", "k", "force_retrieval_every", "pipeline_query",
            "batch_size", "gen_batch_size", "dtype", "attn")


def shard_rows(n: int, i: int, shards: int) -> list[int]:
    return list(range(n))[shard_slice(n, i, shards)]


def request_key(req: RunConfig, n: int, fingerprints: dict[str, Any]) -> dict[str, Any]:
    """What a shard is a part of: the fingerprints of checkpoint, data and index, the rows, the options."""
    return {**fingerprints, "n": n, "faiss": {"nprobe": req.faiss.nprobe, "ef_search": req.faiss.ef_search},
            **{k: getattr(req, k) for k in DECODING}}


def _complete(d: Path) -> dict | None:
    return complete_manifest(d, STAGE, FILES)


def kept_shard(out: Path, i: int, shards: int, key: dict[str, Any]) -> bool:
    """True when shard ``i`` of ``out`` is complete and was made for this very request."""
    man = _complete(shard_dir(out, i, shards))
    return man is not None and man.get("request") == _plain(key)


def write_shard(out: Path, i: int, shards: int, raw: Raw, key: dict[str, Any], info: dict[str, Any]) -> Path:
    """Shard ``i``'s raw output, atomically (the directory is renamed into place, manifest last)."""
    target = shard_dir(out, i, shards)
    with staged_dir(target) as tmp:
        (tmp / RAW).write_text(json.dumps(raw.to_json(), default=json_default))
        write_manifest(tmp, STAGE, fingerprint=fingerprint_files(tmp, [RAW]), index=i, shards=shards,
                       request=_plain(key), rows=len(raw.results), **info)
    return target


def read_shards(out: Path, shards: int, key: dict[str, Any], task: str) -> tuple[Raw, dict[str, Any]]:
    """The ``shards`` raws of ``out`` as one run's (in shard order), and shard 0's ``info``; refuses a
    missing shard or one made for another request, naming what differs."""
    mans = [_complete(shard_dir(out, i, shards)) for i in range(shards)]
    missing = [i for i, m in enumerate(mans) if m is None]
    if missing:
        raise ConfigError(f"{shards_dir(out)}: shard(s) {missing} of {shards} are missing or incomplete; run "
                          f"`evaluation run ... --shard I/{shards}` for them first (a complete shard is kept)")
    parts = []
    want = _plain(key)
    for i, man in enumerate(mans):
        d = shard_dir(out, i, shards)
        got = man.get("request") or {}  # type: ignore[union-attr]  (None is refused above)
        diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
        if diff:
            raise ManifestMismatch(f"{d} was made for another run (differs in: {', '.join(diff)}); rerun that shard "
                                   f"with the same options, or delete {shards_dir(out)}")
        parts.append(Raw.from_json(json.loads((d / RAW).read_text()), task))
    return Raw.concat(parts), {**mans[0], "gen_s": [p.gen_s for p in parts]}  # type: ignore[dict-item]


def remove_shards(out: Path) -> None:
    shutil.rmtree(shards_dir(out), ignore_errors=True)


def _plain(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (paths as strings), so a stored request compares equal."""
    return json.loads(json.dumps(obj, default=json_default))
