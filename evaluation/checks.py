"""Checks that need no model: manifests, files and sizes only (no torch import).

``evaluation`` runs them before it loads a checkpoint, so a wrong input (a dataset tokenised with
another tokenizer, an index of another checkpoint, a truncated shard) is refused in about a second
instead of after the model and its libraries are loaded. ``runtime.check_compatible`` and
``index.open_index`` use the same functions, so the messages are the same either way.
"""

from __future__ import annotations

import json
from pathlib import Path

from onegen.errors import ManifestMismatch
from onegen.manifest import ONEGEN_CONFIG
from onegen.prepared import read_output_manifest
from onegen.shards import verify_shards


def model_manifest(model_dir: str | Path) -> dict:
    """The export's manifest (stage ``train``), with a clear error when it is not a model export
    (a training run given for its ``model/``, a path that does not exist: ``onegen.prepared.not_an_output``)."""
    return read_output_manifest(model_dir, "train")


def onegen_config(model_dir: str | Path) -> dict:
    p = Path(model_dir) / ONEGEN_CONFIG
    if not p.is_file():
        raise ManifestMismatch(f"{model_dir} has no {ONEGEN_CONFIG}: not a onegen checkpoint export")
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestMismatch(f"{p}: not valid JSON ({e}); export the checkpoint again") from None


def check_data_for_model(model_dir: str | Path, data_dir: str | Path, data_manifest: dict,
                         mman: dict | None = None, ocfg: dict | None = None) -> None:
    """Refuse a prepared dataset tokenised differently from the model (ids would silently be wrong)."""
    man = mman if mman is not None else model_manifest(model_dir)
    cfg = ocfg if ocfg is not None else onegen_config(model_dir)
    want = data_manifest.get("tokenizer", {})
    if man.get("tokenizer_fingerprint") and want.get("fingerprint") and man["tokenizer_fingerprint"] != want["fingerprint"]:
        raise ManifestMismatch(
            f"{data_dir} was tokenised with tokenizer {want['fingerprint'][:12]} but the model {model_dir} uses "
            f"{man['tokenizer_fingerprint'][:12]}; prepare the data with the model's tokenizer "
            f"(python -m data_prep ... --tokenizer {model_dir})"
        )
    have_ids, data_ids = cfg.get("special_token_ids", {}), want.get("special_token_ids", {})
    diff = {t: (data_ids.get(t), i) for t, i in have_ids.items() if t in data_ids and data_ids[t] != i}
    if diff:
        raise ManifestMismatch(f"{data_dir} and the model {model_dir} disagree on special-token ids "
                               f"(token: (data id, model id)) {diff}")


def preflight(model_dir: str | Path, data_dir: str | Path) -> tuple[dict, dict, dict]:
    """Model export + prepared dataset, checked against each other without loading either.

    Returns ``(model manifest, onegen_config, data manifest)``.
    """
    mman = model_manifest(model_dir)
    ocfg = onegen_config(model_dir)
    dman = read_output_manifest(data_dir, "data_prep")
    verify_shards(data_dir, dman)
    check_data_for_model(model_dir, data_dir, dman, mman, ocfg)
    return mman, ocfg, dman
