"""The document index: every document's RET-token vector, produced by the checkpoint itself.

``build_index`` encodes each row of a prepared dataset's ``docs/`` (its final ``[RD]``/``[SE]``
state, L2-normalised, via ``onegen.hidden`` — the vectors training used) and writes::

    INDEX_DIR/embeddings.npy   float32 [N, d] (row i = doc_ids[i])
              doc_ids.json     [N] doc ids
              index.faiss      faiss index over the rows, inner product (= cosine: rows are unit norm)
              manifest.json    stage "index": model + dataset fingerprints, count, dim, metric, kind,
                               the dtype / attention / device the vectors were computed with, faiss GPU options

The directory is written under a temporary name and renamed when complete, manifest last: an
interrupted build never leaves a directory that ``open_index`` accepts.

Documents are encoded shortest first (all of them sorted by token count, then batched), so a batch
pads to about its own length; the vectors are written back in ``docs/`` order, which the index keeps.

Subset indexes (``rows=N``; ``evaluation run --max-examples N`` in the distractor setting, ``evaluation
index --rows N``): only the documents the first N query rows can retrieve — their candidate
paragraphs and gold positives — are encoded, in ``docs/`` order. The manifest's ``subset``
(``{"rows": N, "docs": ..., "of_docs": ...}``; None for a full index) says so: such an index is
reused only for runs over at most those N rows in the distractor setting (``index_reuse``), and
refuses an open-setting search.

Kinds: ``flat`` (``IndexFlatIP``, exact, default), ``ivf`` (``IndexIVFFlat``, nlist ≈ √N,
approximate), ``ivfpq`` (``IndexIVFPQ``: the same lists, vectors product-quantised to ``pq_m``
bytes), ``hnsw`` (``IndexHNSWFlat``, approximate); ``params.bytes_per_vector`` in the manifest. With faiss-gpu and CUDA, flat/ivf
indexes are searched on the GPUs, *sharded* (each GPU holds 1/n of the vectors; faiss's default
would replicate the whole index on every GPU), optionally stored in fp16 (``faiss_fp16``); ivf is
also trained and filled there. A flat index is filled on the CPU (adding is a copy); HNSW stays on
CPU. The saved ``index.faiss`` is always exact fp32: fp16 is a GPU memory/speed option only.

Two search settings (``DocIndex.search``): *open* (faiss over the whole index) and *distractor*
(``restrict``: each query scored exactly against its own candidate ids, from the stored vectors).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
import typing
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from tqdm.auto import tqdm

from evaluation.checks import model_manifest
from evaluation.config import IndexKind, IndexParams
from evaluation.doc_select import doc_positions, encode_into, subset_doc_ids
from onegen.errors import ConfigError, ManifestMismatch
from onegen.manifest import fingerprint_files, read_manifest, write_manifest
from onegen.prepared import open_prepared
from onegen.runlock import LOCK_NAME, DirLock

KINDS: tuple[str, ...] = typing.get_args(IndexKind)
EMBEDDINGS = "embeddings.npy"
DOC_IDS = "doc_ids.json"
FAISS_FILE = "index.faiss"
ADD_CHUNK = 65536  # vectors per faiss add
Hits = list[tuple[str, float]]


def _faiss():
    # heavy (faiss): imported where an index is built or searched (tests replace this function)
    import faiss

    return faiss


def faiss_has_gpu() -> bool:
    """True when faiss was built with GPU support, sees a GPU, and torch sees CUDA."""
    # heavy (torch): imported only when GPU faiss is asked about
    import torch

    faiss = _faiss()
    return bool(hasattr(faiss, "index_cpu_to_all_gpus") and getattr(faiss, "get_num_gpus", lambda: 0)() > 0
                and torch.cuda.is_available())


def gpu_cloner_options(fp16: bool, faiss_mod: Any = None) -> Any:
    """Options for ``index_cpu_to_all_gpus``: shard the vectors across the GPUs (faiss's default
    replicates the whole index on each), fp16 storage when asked. ``faiss_mod``: the faiss module
    (a stand-in in CPU tests: faiss-cpu has no ``GpuMultipleClonerOptions``)."""
    faiss = faiss_mod or _faiss()
    co = faiss.GpuMultipleClonerOptions()
    co.shard = True
    co.useFloat16 = bool(fp16)
    co.useFloat16CoarseQuantizer = False  # ivf: assign to lists exactly
    return co


def to_gpus(index: Any, fp16: bool, faiss_mod: Any = None) -> tuple[Any, dict]:
    """``index`` sharded across every GPU; and the options used (for the manifest / MLflow params)."""
    faiss = faiss_mod or _faiss()
    gpu = faiss.index_cpu_to_all_gpus(index, co=gpu_cloner_options(fp16, faiss))
    return gpu, {"shard": True, "fp16": bool(fp16), "gpus": int(faiss.get_num_gpus())}


def _train_ivf(faiss: Any, index: Any, emb: np.ndarray, nlist: int, gpu: bool) -> int:
    """Train the coarse quantizer once, before any sharding (shards trained apart would each get their
    own centroids); on GPUs the k-means assignment runs there (``clustering_index``). The number of
    training vectors (a fixed-seed sample of at most 256 per list)."""
    # faiss wants 39..256 training points per list; a fixed-seed sample keeps big builds cheap.
    n = len(emb)
    cap = 256 * nlist
    rows = np.sort(np.random.default_rng(0).choice(n, cap, replace=False)) if n > cap else slice(None)
    clus = to_gpus(faiss.IndexFlatIP(index.d), False, faiss)[0] if gpu else None
    if clus is not None:
        index.clustering_index = clus  # a raw pointer in faiss: ``clus`` keeps the GPU index alive meanwhile
    index.train(np.ascontiguousarray(emb[rows]))
    if clus is not None:
        index.clustering_index = None
    return min(n, cap)


def _make_faiss(emb: np.ndarray, kind: str, params: IndexParams) -> tuple[object, dict]:
    """A CPU faiss index holding ``emb`` (trained first for ivf); and the parameters used."""
    faiss = _faiss()
    n, d = emb.shape
    if kind == "flat":
        index, used = faiss.IndexFlatIP(d), {}
    elif kind == "ivf":
        nlist = params.nlist or max(1, round(math.sqrt(n)))
        if nlist > n:
            raise ConfigError(f"ivf index: nlist={nlist} exceeds the {n} documents; lower nlist or use kind=flat")
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        used = {"nlist": nlist, "nprobe": min(nlist, params.nprobe or max(8, nlist // 8))}
    elif kind == "ivfpq":
        nlist = params.nlist or max(1, round(math.sqrt(n)))
        m = params.pq_m or max(1, d // 4)
        if d % m:
            raise ConfigError(f"ivfpq index: pq_m={m} does not divide the dimension {d}")
        if nlist > n or n < 256:  # 8-bit codes: 256 centroids per sub-quantizer need >= 256 training vectors
            raise ConfigError(f"ivfpq index: {n} documents are too few (nlist={nlist}, and 256 per code book); "
                              f"use kind=flat or ivf")
        index = faiss.IndexIVFPQ(faiss.IndexFlatIP(d), d, nlist, m, 8, faiss.METRIC_INNER_PRODUCT)
        used = {"nlist": nlist, "nprobe": min(nlist, params.nprobe or max(8, nlist // 8)), "pq_m": m, "pq_bits": 8,
                "refine": params.refine}
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        used = {"hnsw_m": params.hnsw_m, "ef_search": params.ef_search or 128}
    else:
        raise ConfigError(f"index kind {kind!r} is not one of {list(KINDS)}")
    # Only ivf gains from the GPUs at build time (list assignment); a flat add is a copy.
    gpu = kind == "ivf" and faiss_has_gpu()
    if kind in ("ivf", "ivfpq"):
        used["train_sample"] = _train_ivf(faiss, index, emb, used["nlist"], gpu)
    work = index
    if gpu:
        work, used["gpu"] = to_gpus(index, params.faiss_fp16, faiss)
    for s in range(0, n, ADD_CHUNK):  # sharded ivf numbers the vectors itself, so chunks are fine
        work.add(np.ascontiguousarray(emb[s:s + ADD_CHUNK]))
    used["built_on_gpu"] = gpu
    used["bytes_per_vector"] = _bytes_per_vector(kind, d, used)
    return (faiss.index_gpu_to_cpu(work) if gpu else work), used


def _bytes_per_vector(kind: str, d: int, used: dict) -> float:
    """The index's own memory per vector (besides the float32 embeddings kept for exact re-scoring):
    codes plus ids; hnsw adds its graph's links (2·M neighbours at level 0, 4 bytes each)."""
    if kind == "ivfpq":
        return float(used["pq_m"] * used["pq_bits"] // 8 + 8)
    if kind == "hnsw":
        return float(4 * d + 2 * used["hnsw_m"] * 4)
    return float(4 * d + (8 if kind == "ivf" else 0))


def _runtime_for(model_dir: str | Path, data: Any, fingerprint: str, runtime: Any, device: str | None, dtype: str,
                 attn: str) -> Any:
    """The given runtime (checked to hold ``model_dir``'s checkpoint), else ``model_dir`` loaded."""
    # heavy (evaluation.runtime loads torch): imported where a model is needed
    from evaluation.runtime import check_compatible, load_runtime

    if runtime is None:
        return load_runtime(model_dir, data, device=device, dtype=dtype, attn=attn)
    if runtime.fingerprint != fingerprint:
        raise ManifestMismatch(f"the runtime given to build_index holds checkpoint {runtime.fingerprint[:12]}, "
                               f"not {model_dir} ({fingerprint[:12]})")
    check_compatible(model_dir, data)
    return runtime


def build_index(model_dir: str | Path, prepared_dir: str | Path, out_dir: str | Path, *, kind: IndexKind = "flat",
                batch_size: int = 64, device: str | None = None, params: IndexParams | None = None,
                runtime=None, progress: bool = True, dtype: str = "auto", attn: str = "auto",
                rows: int | None = None) -> dict:
    """Encode every document of ``prepared_dir/docs`` with the checkpoint and write an index dir.

    ``rows``: only the documents of the first ``rows`` query rows (``subset_doc_ids``: a subset
    index, recorded in the manifest's ``subset``). ``runtime``: an already loaded
    :class:`evaluation.runtime.Runtime` of ``model_dir`` to reuse (its dtype/attention are recorded);
    else the model is loaded on ``device`` with ``dtype`` / ``attn``
    (``evaluation.runtime.resolve_precision``). The vectors are float32 whatever the dtype.
    Returns the index manifest.
    """
    if kind not in KINDS:
        raise ConfigError(f"index kind {kind!r} is not one of {list(KINDS)}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    params = params or IndexParams()
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    # One writer: the lock lives beside the dir, which a finished build replaces by a rename.
    with DirLock(out_dir, lock_path=out_dir.parent / f".{out_dir.name}{LOCK_NAME}"):
        data = open_prepared(prepared_dir)
        all_ids = data.docs["doc_id"][:]  # a list: indexing the lazy column row by row took 0.4 ms a document
        if len(data.doc_index) != len(all_ids):
            raise ManifestMismatch(f"{prepared_dir}/docs holds duplicate doc ids; the index needs unique ids")
        positions = doc_positions(data, subset_doc_ids(data, rows) if rows is not None else None)
        subset = None if rows is None else {"rows": min(rows, len(data)), "docs": len(positions), "of_docs": len(all_ids)}
        mman = model_manifest(model_dir)
        runtime = _runtime_for(model_dir, data, mman["fingerprint"], runtime, device, dtype, attn)
        n, dim = len(positions), int(runtime.model.config.hidden_size)

        with staged_dir(out_dir) as tmp:
            emb = np.lib.format.open_memmap(tmp / EMBEDDINGS, mode="w+", dtype=np.float32, shape=(n, dim))
            bar = tqdm(total=n, desc=f"index {Path(prepared_dir).name}", unit="doc", disable=not progress)
            t_enc = time.perf_counter()
            encode_into(emb, runtime, data.docs, positions, batch_size, bar)
            t_enc = time.perf_counter() - t_enc
            bar.close()
            emb.flush()
            (tmp / DOC_IDS).write_text(json.dumps([all_ids[p] for p in positions]))
            manifest = finish_index(
                tmp, emb, kind, params, t0, model_fingerprint=mman["fingerprint"],
                model_dir=str(Path(model_dir).resolve()), prepared_fingerprint=data.fingerprint,
                prepared_dir=str(Path(prepared_dir).resolve()), task=data.task, count=n, dim=dim, subset=subset,
                ret_tokens=runtime.tagger.tokens.doc_ret_tokens(), **runtime.precision_record(),
                encode_seconds=round(t_enc, 3))
            del emb
        return manifest


def finish_index(tmp: Path, emb: np.ndarray, kind: str, params: IndexParams, t0: float, **fields: Any) -> dict:
    """The faiss index over ``emb`` (already in ``tmp/embeddings.npy``, ids in ``tmp/doc_ids.json``) and
    the manifest, written last: what a one-process build and a merge of shards both end with."""
    index, used = _make_faiss(np.asarray(emb), kind, params)
    _faiss().write_index(index, str(tmp / FAISS_FILE))
    return write_manifest(tmp, "index", fingerprint=fingerprint_files(tmp, [EMBEDDINGS, DOC_IDS, FAISS_FILE]),
                          metric="ip", normalized=True, kind=kind, params=used, faiss_version=_faiss().__version__,
                          faiss_gpu={"shard": True, "fp16": bool(params.faiss_fp16)},
                          **fields, build_seconds=round(time.perf_counter() - t0, 3))


@contextlib.contextmanager
def staged_dir(target: Path) -> Iterator[Path]:
    """A fresh temporary sibling of ``target`` to write into: renamed into place when the block ends,
    deleted when it raises (what a killed process leaves behind, the next one removes)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_leftovers(out_dir: Path) -> None:
    """Delete the temp/aside dirs of builds that were killed (SIGKILL skips our cleanup); a build
    still running (its pid alive) keeps its own."""
    for p in list(out_dir.parent.glob(f".{out_dir.name}.tmp-*")) + list(out_dir.parent.glob(f".{out_dir.name}.old-*")):
        try:
            pid = int(p.name.rsplit("-", 1)[1])
            os.kill(pid, 0)
            alive = pid != os.getpid()
        except (ValueError, ProcessLookupError):
            alive = False
        except PermissionError:  # a live process of another user
            alive = True
        if not alive:
            shutil.rmtree(p, ignore_errors=True)


def replace_dir(tmp: Path, out_dir: Path) -> None:
    """Rename the finished temp dir into place; an old index there is moved aside first, then deleted."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class DocIndex:
    """Document vectors and their faiss index; ``search`` in the open or the distractor setting."""

    def __init__(self, doc_ids: Sequence[str], embeddings: np.ndarray, faiss_index=None, manifest: dict | None = None,
                 path: Path | None = None) -> None:
        if embeddings.ndim != 2 or embeddings.shape[0] != len(doc_ids):
            raise ManifestMismatch(f"{path or 'index'}: {len(doc_ids)} doc ids but embeddings of shape {embeddings.shape}")
        self.doc_ids = list(doc_ids)
        self.embeddings = embeddings
        self.position = {d: i for i, d in enumerate(self.doc_ids)}
        self.manifest = manifest or {}
        self.path = path
        self._faiss = faiss_index
        self.gpu: dict | None = None  # the faiss GPU options when the index was put on GPUs (open_index)

    @classmethod
    def from_arrays(cls, doc_ids: Sequence[str], embeddings: np.ndarray) -> "DocIndex":
        """An in-memory exact index (used by the dense pipeline baseline and tests)."""
        emb = np.ascontiguousarray(embeddings, dtype=np.float32)
        index = _faiss().IndexFlatIP(emb.shape[1])
        if len(emb):
            index.add(emb)
        return cls(doc_ids, emb, index, {"kind": "flat", "metric": "ip", "count": len(doc_ids), "dim": emb.shape[1]})

    def __len__(self) -> int:
        return len(self.doc_ids)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def vector(self, doc_id: str) -> np.ndarray:
        return np.asarray(self.embeddings[self._pos(doc_id)], dtype=np.float32)

    def _pos(self, doc_id: str) -> int:
        try:
            return self.position[doc_id]
        except KeyError:
            raise ManifestMismatch(f"document {doc_id!r} is not in the index {self.path or ''} "
                                   f"({len(self)} docs); was it built from the same prepared dataset?") from None

    def search(self, queries: np.ndarray, k: int, restrict: Sequence[Sequence[str] | None] | None = None) -> list[Hits]:
        """Top-``k`` ``(doc_id, inner product)`` per query, best first.

        ``queries``: [n, d] (L2-normalise them first: the stored vectors are unit norm).
        ``restrict``: per query, the candidate doc ids to score (the distractor setting; exact, from
        the stored vectors; ties keep candidate order); None (or a None entry) searches the whole
        index with faiss (the open setting).
        """
        q = np.asarray(queries, dtype=np.float32)
        q = np.ascontiguousarray(q[None] if q.ndim == 1 else q)
        if q.ndim != 2 or (len(q) and q.shape[1] != self.dim):
            raise ValueError(f"queries of shape {q.shape} do not match the index dimension {self.dim}")
        if k < 1:
            raise ConfigError(f"k must be >= 1, got {k}")
        if restrict is not None and len(restrict) != len(q):
            raise ValueError(f"{len(q)} queries but {len(restrict)} candidate lists")
        out: list[Hits | None] = [None] * len(q)
        open_rows = []
        for i in range(len(q)):
            cands = restrict[i] if restrict is not None else None
            if cands is None:
                open_rows.append(i)
                continue
            if not len(cands):
                out[i] = []
                continue
            pos = np.fromiter((self._pos(c) for c in cands), dtype=np.int64, count=len(cands))
            scores = np.asarray(self.embeddings[pos], dtype=np.float32) @ q[i]
            top = np.argsort(-scores, kind="stable")[:k]
            out[i] = [(str(cands[j]), float(scores[j])) for j in top]
        if open_rows:
            if self.manifest.get("subset"):
                sub = self.manifest["subset"]
                raise ManifestMismatch(f"{self.path}: a subset index (the {sub['docs']} documents of the first "
                                       f"{sub['rows']} rows) cannot answer an open-setting search; use a full index")
            if self._faiss is None:
                raise ManifestMismatch(f"{self.path}: this index has no faiss index for the open setting")
            for i, hits in zip(open_rows, self._open_search(q[open_rows], k)):
                out[i] = hits
        return out  # type: ignore[return-value]


    def _open_search(self, q: np.ndarray, k: int) -> list[Hits]:
        """faiss over the whole index. A product-quantised index (ivfpq) returns ``refine`` x ``k``
        candidates by their approximate scores, re-scored exactly from the stored vectors: PQ codes alone
        rank the anisotropic states of an LM poorly."""
        refine = int(self.manifest.get("params", {}).get("refine", 1)) if self.manifest.get("kind") == "ivfpq" else 1
        scores, ids = self._faiss.search(q, min(k * refine, max(len(self), 1)))
        out = []
        for row in range(len(q)):
            found = np.sort(ids[row][ids[row] >= 0])  # ascending: the stored vectors are read in order
            if refine > 1 and len(found):
                exact = np.asarray(self.embeddings[found], dtype=np.float32) @ q[row]
                order = np.argsort(-exact, kind="stable")[:k]
                out.append([(self.doc_ids[found[o]], float(exact[o])) for o in order])
            else:
                out.append([(self.doc_ids[j], float(s)) for j, s in zip(ids[row], scores[row]) if j >= 0])
        return out


def _load_embeddings(path: Path, mmap: bool) -> np.ndarray:
    """``embeddings.npy`` as float32 [N, d]; never unpickles (``allow_pickle=False``): a file holding
    Python objects, or a truncated or foreign one, is refused with its path."""
    fmt = np.lib.format
    try:
        with open(path, "rb") as f:  # the header alone first: what the file holds, before reading any of it
            version = fmt.read_magic(f)
            shape, _, dtype = (fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0)(f)
    except (ValueError, OSError, EOFError) as e:
        raise ManifestMismatch(f"{path}: not a .npy array ({e}); rebuild the index") from None
    if dtype.hasobject:
        raise ManifestMismatch(f"{path}: holds pickled Python objects, which are never loaded; rebuild the index")
    if dtype != np.float32 or len(shape) != 2:
        raise ManifestMismatch(f"{path}: expected a float32 [N, d] array, got {dtype} of shape {shape}; rebuild the index")
    try:
        return np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except (ValueError, OSError) as e:  # e.g. truncated data after a valid header
        raise ManifestMismatch(f"{path}: unreadable ({e}); rebuild the index") from None


def open_index(index_dir: str | Path, model_dir: str | Path | None = None, *, use_gpu: bool | None = None,
               nprobe: int | None = None, ef_search: int | None = None, mmap: bool = True,
               fp16: bool | None = None) -> DocIndex:
    """Load an index directory (no pickle anywhere) and check it against the checkpoint ``model_dir``.

    Raises ``ManifestMismatch`` when the directory is incomplete (no manifest: an interrupted
    build), its files disagree with the manifest, or it was built by another checkpoint.
    ``use_gpu``: None = on the GPUs when faiss-gpu and CUDA are there (flat/ivf only), sharded
    across them; ``fp16``: vectors held in fp16 there (None = the manifest's ``faiss_gpu.fp16``).
    """
    index_dir = Path(index_dir)
    man = read_manifest(index_dir, expect_stage="index")
    for f in (EMBEDDINGS, DOC_IDS, FAISS_FILE):
        if not (index_dir / f).is_file():
            raise ManifestMismatch(f"{index_dir} has a manifest but no {f}: the index is incomplete; rebuild it")
    if model_dir is not None:
        want = model_manifest(model_dir)["fingerprint"]
        if man.get("model_fingerprint") != want:
            raise ManifestMismatch(
                f"index {index_dir} was built by checkpoint {str(man.get('model_fingerprint'))[:12]} "
                f"({man.get('model_dir')}) but the model given is {model_dir} ({want[:12]}): its document vectors "
                f"do not live in this model's embedding space; rebuild the index with this model "
                f"(build_index({str(model_dir)!r}, {man.get('prepared_dir')!r}, ...))"
            )
    emb = _load_embeddings(index_dir / EMBEDDINGS, mmap)
    try:
        doc_ids = json.loads((index_dir / DOC_IDS).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestMismatch(f"{index_dir / DOC_IDS}: not valid JSON ({e}); rebuild the index") from None
    if not isinstance(doc_ids, list) or not all(isinstance(d, str) for d in doc_ids):
        raise ManifestMismatch(f"{index_dir / DOC_IDS}: expected a JSON list of doc id strings; rebuild the index")
    if emb.shape != (man["count"], man["dim"]) or len(doc_ids) != man["count"]:
        raise ManifestMismatch(f"{index_dir}: files hold {len(doc_ids)} ids / embeddings {emb.shape} but the manifest "
                               f"says {man['count']} x {man['dim']}; the directory was modified after the build")
    faiss = _faiss()
    try:
        index = faiss.read_index(str(index_dir / FAISS_FILE))  # faiss's own format: no pickle
    except RuntimeError as e:
        reason = (str(e).strip().splitlines() or ["unreadable"])[-1]
        raise ManifestMismatch(f"{index_dir / FAISS_FILE}: not a readable faiss index ({reason}); rebuild the index") from None
    if index.ntotal != man["count"]:
        raise ManifestMismatch(f"{index_dir}/{FAISS_FILE} holds {index.ntotal} vectors, the manifest says {man['count']}")
    params = man.get("params", {})
    if man.get("kind") in ("ivf", "ivfpq"):
        index.nprobe = int(nprobe or params.get("nprobe", 8))
    elif man.get("kind") == "hnsw":
        index.hnsw.efSearch = int(ef_search or params.get("ef_search", 128))
    gpu = None
    if (faiss_has_gpu() if use_gpu is None else use_gpu) and man.get("kind") != "hnsw":
        half = bool(man.get("faiss_gpu", {}).get("fp16", False)) if fp16 is None else fp16
        index, gpu = to_gpus(index, half, faiss)
    out = DocIndex(doc_ids, emb, index, man, index_dir)
    out.gpu = gpu
    return out
