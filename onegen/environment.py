"""The offline environment every entry point runs in (what ``scripts/env.sh`` exports, for Python).

``python -m data_prep``, ``python -m evaluation``, ``pipeline/train.py`` and the quickstart call
``apply_offline_defaults()`` first, before torch, transformers or DeepSpeed is imported, so that a
command run without ``source scripts/env.sh`` behaves like one run with it:

* no hub access (``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE``/``HF_DATASETS_OFFLINE``=1): nothing is
  downloaded behind the user's back; huggingface_hub reads these once, when it is imported;
* no MLflow telemetry, no tokenizers fork warning;
* DeepSpeed's JIT-built ops in the checkout's cache (``.cache/torch_extensions``): built once
  (~22 s), then reused by every run, instead of a silent rebuild under ``~/.cache``;
* ``HF_HOME`` inside the checkout's cache.

A variable the user has set is never changed (``scripts/env.sh`` does the same).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import MutableMapping

ROOT = Path(__file__).resolve().parent.parent
OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")

# Variables set by the last apply_offline_defaults() on os.environ (allow_network() undoes only these).
_SET_BY_US: set[str] = set()


def offline_defaults(root: Path = ROOT) -> dict[str, str]:
    """The defaults, as ``scripts/env.sh`` sets them."""
    cache = root / ".cache"
    return {
        **{k: "1" for k in OFFLINE_VARS},
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "TORCH_EXTENSIONS_DIR": str(cache / "torch_extensions"),
        "HF_HOME": str(cache / "huggingface"),
    }


def apply_offline_defaults(env: MutableMapping[str, str] | None = None, *, network: bool = False) -> dict[str, str]:
    """Set each default that ``env`` (default ``os.environ``) does not set yet; return what was set.

    ``network=True`` (``data_prep --allow-network``) leaves the hub variables alone."""
    target = os.environ if env is None else env
    added = {}
    for key, value in offline_defaults().items():
        if network and key in OFFLINE_VARS:
            continue
        if key not in target:
            target[key] = value
            added[key] = value
    if env is None:
        _SET_BY_US.update(added)
        for key in ("TORCH_EXTENSIONS_DIR", "HF_HOME"):
            try:
                Path(target[key]).mkdir(parents=True, exist_ok=True)
            except OSError:  # a read-only checkout: the libraries fall back to their own defaults
                pass
    return added


def allow_network() -> None:
    """Undo the offline defaults this process set (a recipe that says ``allow_network: true``).

    Only before huggingface_hub is imported does this have an effect; a user's own setting stays."""
    for key in OFFLINE_VARS:
        if key in _SET_BY_US:
            os.environ.pop(key, None)
            _SET_BY_US.discard(key)
