"""Sharded index builds: N processes each encode a disjoint slice of the documents, then one merges.

The documents an index holds (all, or a subset: ``evaluation.doc_select``) are cut into N
contiguous slices in ``docs/`` order; process I encodes slice I into ``OUT.shards/shard-I-of-N/``
(``embeddings.npy``, ``doc_ids.json``, and a manifest written last, the directory renamed into place
when complete). The merge concatenates the shards in order, so the merged index keeps ``docs/``
order and equals a one-process build (same ids; vectors within floating-point tolerance, since a
batch's padding depends on its neighbours), and writes the ordinary index directory ``OUT``.

Who runs what:
* under ``torchrun`` / ``deepspeed`` (``WORLD_SIZE`` > 1): rank I encodes slice I of WORLD_SIZE, and
  rank 0 waits for every shard, then merges;
* a SLURM job array: task I runs ``evaluation index --shard I/N``; a job after the array runs
  ``evaluation index --merge N``.

A complete shard of the same checkpoint, data, subset and precision is kept on a rerun: after a
killed process, only its shard is encoded again, and the merged index has the same fingerprint as
an uninterrupted build. The merge deletes the shards once the index is in place.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from evaluation.checks import model_manifest
from evaluation.config import IndexKind, IndexParams
from evaluation.doc_select import doc_positions, encode_into, subset_doc_ids
from evaluation.index import DOC_IDS, EMBEDDINGS, _runtime_for, finish_index, staged_dir
from evaluation.sharding import complete_manifest, shard_dir, shard_slice, shards_dir
from onegen.errors import ConfigError, ManifestMismatch
from onegen.manifest import fingerprint_files, write_manifest
from onegen.prepared import open_prepared

SHARD_STAGE = "index-shard"
SHARD_FILES = (EMBEDDINGS, DOC_IDS)
# What must agree between a shard on disk and the request (and between the shards of one merge).
_SAME = ("model_fingerprint", "prepared_fingerprint", "subset_rows", "shards", "dtype", "attn")


def _complete(d: Path) -> dict | None:
    return complete_manifest(d, SHARD_STAGE, SHARD_FILES)


def encode_shard(model_dir: str | Path, prepared_dir: str | Path, out_dir: str | Path, i: int, n: int, *,
                 batch_size: int = 64, device: str | None = None, dtype: str = "auto", attn: str = "auto",
                 rows: int | None = None, progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Encode slice ``i`` of ``n`` of the documents into ``shard_dir(out_dir, i, n)``; its manifest.
    A complete shard of the same checkpoint, data, subset and precision is kept as it is."""
    # torch: loaded when documents are encoded, not by --help
    from evaluation.precision import resolve_precision

    t0 = time.perf_counter()
    data = open_prepared(prepared_dir)
    mman = model_manifest(model_dir)
    prec = resolve_precision(device, dtype, attn).record()
    want = {"model_fingerprint": mman["fingerprint"], "prepared_fingerprint": data.fingerprint, "subset_rows": rows,
            "shards": n, "dtype": prec["dtype"], "attn": prec["attn"]}
    target = shard_dir(out_dir, i, n)
    done = _complete(target)
    if done is not None and all(done.get(k) == want[k] for k in _SAME):
        log(f"shard {i}/{n} of {out_dir}: complete, kept ({done['count']} documents)")
        return done
    positions = doc_positions(data, subset_doc_ids(data, rows) if rows is not None else None)
    part = positions[shard_slice(len(positions), i, n)]
    runtime = _runtime_for(model_dir, data, mman["fingerprint"], None, device, dtype, attn)
    dim = int(runtime.model.config.hidden_size)
    with staged_dir(target) as tmp:
        emb = np.lib.format.open_memmap(tmp / EMBEDDINGS, mode="w+", dtype=np.float32, shape=(len(part), dim))
        t_enc = time.perf_counter()
        with tqdm(total=len(part), desc=f"shard {i}/{n}", unit="doc", disable=not progress) as bar:
            encode_into(emb, runtime, data.docs, part, batch_size, bar)
        t_enc = time.perf_counter() - t_enc
        emb.flush()
        del emb
        ids = data.docs["doc_id"][:]  # a list (see build_index)
        (tmp / DOC_IDS).write_text(json.dumps([ids[p] for p in part]))
        same = {k: v for k, v in want.items() if k not in ("dtype", "attn")}  # those come with the precision record
        man = write_manifest(tmp, SHARD_STAGE, fingerprint=fingerprint_files(tmp, [EMBEDDINGS, DOC_IDS]), **same,
                             index=i, count=len(part), dim=dim, of_docs=len(positions), all_docs=len(data.docs),
                             task=data.task,
                             model_dir=str(Path(model_dir).resolve()), prepared_dir=str(Path(prepared_dir).resolve()),
                             ret_tokens=runtime.tagger.tokens.doc_ret_tokens(), **runtime.precision_record(),
                             encode_seconds=round(t_enc, 3), seconds=round(time.perf_counter() - t0, 3))
    log(f"shard {i}/{n} of {out_dir}: {len(part)} documents in {man['encode_seconds']:.1f}s")
    return man


def merge_shards(out_dir: str | Path, n: int, *, kind: IndexKind = "flat", params: IndexParams | None = None,
                 keep: bool = False, log: Callable[[str], None] = print) -> dict:
    """Concatenate the ``n`` complete shards of ``out_dir`` (in order) into the index ``out_dir``."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    mans = [_complete(shard_dir(out_dir, i, n)) for i in range(n)]
    missing = [i for i, m in enumerate(mans) if m is None]
    if missing:
        raise ConfigError(f"{shards_dir(out_dir)}: shard(s) {missing} of {n} are missing or incomplete; run "
                          f"`evaluation index ... --shard I/{n}` for them first (a complete shard is kept)")
    first = mans[0]
    for i, m in enumerate(mans):
        diff = [k for k in _SAME if m.get(k) != first.get(k)]
        if diff or m.get("index") != i:
            raise ManifestMismatch(f"shard {i} of {shards_dir(out_dir)} disagrees with shard 0 on {diff or ['index']}: "
                                   f"the shards come from different builds; delete {shards_dir(out_dir)} and rebuild")
    if sum(m["count"] for m in mans) != first["of_docs"]:
        raise ManifestMismatch(f"{shards_dir(out_dir)}: the shards hold {sum(m['count'] for m in mans)} documents, "
                               f"the build needs {first['of_docs']}")
    with staged_dir(out_dir) as tmp:
        man = _write_merged(tmp, out_dir, mans, kind, params or IndexParams(), t0)
    if not keep:
        shutil.rmtree(shards_dir(out_dir), ignore_errors=True)
    log(f"index {out_dir}: {man['count']} vectors x {man['dim']} ({kind}) merged from {n} shards")
    return man


def _write_merged(tmp: Path, out_dir: Path, mans: list[dict], kind: IndexKind, params: IndexParams, t0: float) -> dict:
    first, n = mans[0], len(mans)
    count, dim = first["of_docs"], first["dim"]
    emb = np.lib.format.open_memmap(tmp / EMBEDDINGS, mode="w+", dtype=np.float32, shape=(count, dim))
    ids: list[str] = []
    for i, m in enumerate(mans):
        d = shard_dir(out_dir, i, n)
        part = np.load(d / EMBEDDINGS, allow_pickle=False, mmap_mode="r")
        emb[len(ids):len(ids) + len(part)] = part
        ids += json.loads((d / DOC_IDS).read_text())
    emb.flush()
    (tmp / DOC_IDS).write_text(json.dumps(ids))
    subset = None if first["subset_rows"] is None else {"rows": first["subset_rows"], "docs": count,
                                                        "of_docs": first["all_docs"]}
    precision = {k: first[k] for k in ("dtype", "attn", "attn_reason", "device") if k in first}
    return finish_index(tmp, emb, kind, params, t0, model_fingerprint=first["model_fingerprint"],
                        model_dir=first["model_dir"], prepared_fingerprint=first["prepared_fingerprint"],
                        prepared_dir=first["prepared_dir"], task=first["task"], count=count, dim=dim, subset=subset,
                        ret_tokens=first["ret_tokens"], **precision,
                        encode_seconds=round(max(m["encode_seconds"] for m in mans), 3),
                        sharded={"shards": n, "encode_seconds": [m["encode_seconds"] for m in mans]})
