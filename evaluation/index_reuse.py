"""When an index on disk can serve a request, and building one when none can (``evaluation index``,
and ``evaluation run`` without ``--index``).

An index is reused when it was built by the same checkpoint from the same prepared data, of the
same kind, in the same dtype + attention, and holds every document the request can retrieve: a
full index always does; a *subset* index (``evaluation.doc_select``: the documents of the first M
query rows) only for a distractor-setting request over at most M rows. ``rows`` below is what the
request needs: None = every document (the open setting, entity linking, a full ``index``), N = the
documents of the first N rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from evaluation.checks import preflight
from evaluation.index import DOC_IDS, EMBEDDINGS, FAISS_FILE, build_index, open_index
from onegen.errors import ManifestMismatch
from onegen.manifest import read_manifest


def _subset_words(sub: dict) -> str:
    return f"the {sub['docs']} documents of the first {sub['rows']} rows, of {sub['of_docs']}"


def covers(man: dict, rows: int | None) -> tuple[bool, str]:
    """Whether the index of manifest ``man`` holds every document a request needing ``rows`` can retrieve."""
    sub = man.get("subset")
    if not sub:
        return True, "complete"
    if rows is not None and sub["rows"] >= rows:
        return True, f"a subset ({_subset_words(sub)}) that covers the first {rows} rows"
    need = "every document" if rows is None else f"the documents of the first {rows} rows"
    return False, f"it is a subset index ({_subset_words(sub)}), and this request needs {need}"


def existing_index_ok(out_dir: Path, model_fp: str, data_fp: str, kind: str | None,
                      precision: dict | None = None, rows: int | None = None) -> tuple[bool, str]:
    """Whether ``out_dir`` already holds a complete index of this model + data (+ kind, + the dtype and
    attention of ``precision``, a ``Precision.record()``) with the documents of ``rows`` (None: all);
    and why not."""
    # heavy (evaluation.precision loads torch): imported where used
    from evaluation.precision import LEGACY

    if not (out_dir / "manifest.json").is_file():
        return False, "no index there yet"
    try:
        man = read_manifest(out_dir, expect_stage="index")
    except ManifestMismatch as e:
        return False, str(e)
    if man.get("model_fingerprint") != model_fp:
        return False, f"it was built by another checkpoint ({str(man.get('model_fingerprint'))[:12]})"
    if man.get("prepared_fingerprint") != data_fp:
        return False, f"it was built from other data ({str(man.get('prepared_fingerprint'))[:12]})"
    if kind is not None and man.get("kind") != kind:
        return False, f"it is a {man.get('kind')!r} index, {kind!r} was asked for"
    for key in ("dtype", "attn"):  # bf16 vectors are not fp32's: the same model in another precision
        built = man.get(key, LEGACY[key])
        if precision is not None and built != precision[key]:
            return False, f"it was built with {key} {built}, this run uses {precision[key]}"
    ok, why = covers(man, rows)
    if not ok:
        return False, why
    missing = [f for f in (EMBEDDINGS, DOC_IDS, FAISS_FILE) if not (out_dir / f).is_file()]
    if missing:
        return False, f"it is incomplete (no {', '.join(missing)})"
    return True, "complete"


def rows_to_index(data: Any, setting: str, n: int) -> int | None:
    """``n`` when a run over the first ``n`` rows needs only their own documents (the distractor
    setting, fewer rows than the dataset, every row with candidates); None when it needs them all."""
    if setting != "distractor" or n >= len(data):
        return None
    cands = data.queries.select_columns(["candidates"])[:n]["candidates"]
    return n if all(len(c) for c in cands) else None


def reusable_index(model_dir: str | Path, data_dir: str | Path, out_dir: str | Path, *, kind: str = "flat",
                   runtime=None, device: str | None = None, dtype: str = "auto", attn: str = "auto",
                   rows: int | None = None, log: Callable[[str], None] = print) -> tuple[dict | None, str]:
    """The manifest of a complete index at ``out_dir`` that serves this request (same model + data + kind
    + dtype + attention, holding the documents of ``rows``), else None; and why not."""
    # heavy (evaluation.precision loads torch): imported where used
    from evaluation.precision import resolve_precision

    out_dir = Path(out_dir)
    # Manifests, shard sizes and tokenizer fingerprints, and the dtype/attention choice (torch, no model):
    # a cheap rerun is cheap, and a wrong input or an impossible choice is refused at once.
    mman, _, dman = preflight(model_dir, data_dir)
    prec = runtime.precision_record() if runtime is not None else resolve_precision(device, dtype, attn).record()
    if runtime is None:  # (a run with its runtime has said it already)
        log(f"precision: {prec['dtype']}, attention {prec['attn']} ({prec['attn_reason']}), on {prec['device']}")
    ok, why = existing_index_ok(out_dir, mman["fingerprint"], dman["fingerprint"], kind, prec, rows)
    if not ok:
        return None, why
    return read_manifest(out_dir, expect_stage="index"), why


def say_reused(man: dict, out_dir: Path, rows: int | None, params, log: Callable[[str], None]) -> None:
    what = "complete" if not man.get("subset") else covers(man, rows)[1]
    log(f"index {out_dir}: {what} for this checkpoint, data and precision, reused (--force rebuilds it)")
    half = bool(man.get("faiss_gpu", {}).get("fp16", False))
    if params is not None and params.faiss_fp16 != half:  # not a build input: the saved index is exact fp32
        log(f"index {out_dir}: GPU fp16 storage is chosen when the index is searched (`run --faiss-fp16`); "
            f"the saved index is exact fp32 and its recorded default stays {'fp16' if half else 'fp32'}")


def ensure_index(model_dir: str | Path, data_dir: str | Path, out_dir: str | Path, *, kind: str = "flat",
                 force: bool = False, runtime=None, device: str | None = None, batch_size: int = 64,
                 progress: bool = True, log: Callable[[str], None] = print, dtype: str = "auto", attn: str = "auto",
                 params=None, rows: int | None = None) -> tuple[dict, bool]:
    """Build the index unless a complete one of the same model + data + kind + dtype + attention,
    holding the documents of ``rows`` (None: every document), is there; ``(manifest, built)``. A
    build with ``rows`` encodes only the documents of the first ``rows`` rows (a subset index).
    ``runtime``: a loaded runtime to encode with (its precision counts); ``params``:
    ``evaluation.config.IndexParams``."""
    out_dir = Path(out_dir)
    man, why = reusable_index(model_dir, data_dir, out_dir, kind=kind, runtime=runtime, device=device, dtype=dtype,
                              attn=attn, rows=rows, log=log)
    if man is not None and not force:
        say_reused(man, out_dir, rows, params, log)
        return man, False
    if out_dir.exists() and man is None:
        log(f"index {out_dir}: rebuilding, {why}")
    man = build_index(model_dir, data_dir, out_dir, kind=kind, runtime=runtime, device=device,  # type: ignore[arg-type]
                      batch_size=batch_size, progress=progress, dtype=dtype, attn=attn, params=params, rows=rows)
    sub = f"; a subset: {_subset_words(man['subset'])}" if man.get("subset") else ""
    log(f"index {out_dir}: {man['count']} vectors x {man['dim']} ({kind}) in {man['build_seconds']:.1f}s{sub}")
    return man, True


def check_given_index(index_dir: Path, model_dir: Path, data_dir: Path, dman: dict, prec: dict, log,
                      rows: int | None = None) -> None:
    """Refuse an index of another checkpoint or dataset, an incomplete one, or a subset index without
    the documents of ``rows`` (None: every document); say so when it was built in another precision
    than this run's (it is used: the user chose it)."""
    # heavy (evaluation.precision loads torch): imported where used
    from evaluation.precision import LEGACY

    open_index(index_dir, model_dir, use_gpu=False)
    iman = read_manifest(index_dir, expect_stage="index")
    build = f"`python -m evaluation index --model {model_dir} --data {data_dir} --out DIR`"
    if iman.get("prepared_fingerprint") != dman["fingerprint"]:
        raise ManifestMismatch(
            f"index {index_dir} was built from {iman.get('prepared_dir')} ({str(iman.get('prepared_fingerprint'))[:12]}), "
            f"not from {data_dir} ({dman['fingerprint'][:12]}): its doc ids are not this dataset's documents; "
            f"omit --index to build the right one, or run {build}")
    ok, why = covers(iman, rows)
    if not ok:
        raise ManifestMismatch(f"index {index_dir}: {why}; omit --index to build the right one, "
                               f"or build a full index with {build}")
    built = {k: iman.get(k, LEGACY[k]) for k in ("dtype", "attn")}
    if built != {k: prec[k] for k in built}:
        log(f"warning: index {index_dir} was built with {built['dtype']} + {built['attn']}, this run uses "
            f"{prec['dtype']} + {prec['attn']}: documents and queries are encoded in different precisions "
            f"(omit --index, or rebuild it with --dtype {prec['dtype']} --attn {prec['attn']})")
