"""Shared fixtures of the evaluation tests: a tiny synthetic world and two kinds of tiny checkpoints.

* ``random_model`` / ``other_model``: a tiny Llama built in-process from a config with random
  weights (``pipeline.model.build_model``) and saved in the export layout ``evaluation`` reads
  (safetensors + tokenizer + ``onegen_config.json`` + ``manifest.json``) — about a second, so the
  exactness tests (forward counts, query vectors, index round trip) run in the fast tier.
* ``trained_model``: the real thing — ``pipeline/train.py`` (DeepSpeed ZeRO-3 on CPU, 3 steps) and
  its own export; ~40 s, used by the ``slow`` end-to-end tests.

Each is built once per test session (memoised on disk under pytest's base temp dir), whichever
module asks first; the fixtures themselves are module-scoped, as the test modules import them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=1", "model.num_heads=2"]
_BUILT: dict[str, Path] = {}


def _base(tmp_path_factory) -> Path:
    d = tmp_path_factory.getbasetemp() / "onegen_eval"
    d.mkdir(parents=True, exist_ok=True)
    return d


def build_world(out: Path) -> Path:
    from data_prep.world import WorldPrepConfig, prepare_world
    from onegen.config import load_config

    cfg = load_config(WorldPrepConfig, None, [
        f"out={out}", "world.n_train_questions=150", "world.n_dev_questions=20", "world.n_train_el=60",
        "world.n_dev_el=10", "world.n_train_entities=120", "world.n_dev_entities=40", "tokenizer=bpe:600",
    ])
    prepare_world(cfg, log=lambda *a: None)
    return out


def export_random_model(world: Path, out: Path, seed: int = 0) -> Path:
    """A randomly initialised tiny Llama in the layout of ``pipeline.export`` (what evaluation loads)."""
    from transformers import AutoTokenizer

    from onegen.tokens import tokenizer_fingerprint
    from onegen.manifest import fingerprint_files, write_manifest
    from onegen.tokens import SpecialTokens
    from pipeline.config import ModelConfig
    from pipeline.model import build_model

    tok = AutoTokenizer.from_pretrained(str(world / "tokenizer"), local_files_only=True)
    tokens = SpecialTokens()
    cfg = ModelConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, max_position_embeddings=512,
                      dtype="fp32", attn_implementation="sdpa")
    model = build_model(cfg, tok, seed=seed, init_new_tokens=tokens)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    prep = json.loads((world / "rag_dev" / "manifest.json").read_text())
    fp = tokenizer_fingerprint(tok)
    (out / "onegen_config.json").write_text(json.dumps({
        "special_tokens": tokens.to_dict(),
        "special_token_ids": {t: tok.convert_tokens_to_ids(t) for t in tokens.all_tokens()},
        "mode": "onegen", "task": ["rag"], "tokenizer_fingerprint": fp, "templates": prep["config"]["tagging"],
        "step": 0,
    }, indent=2))
    weights = sorted(p.name for p in out.iterdir() if p.suffix == ".safetensors")
    write_manifest(out, "train", fingerprint=fingerprint_files(out, weights), model_source="tiny", mode="onegen",
                   step=0, tokenizer_fingerprint=fp, data_fingerprints=[])
    return out


def train_model(world: Path, out: Path) -> Path:
    """Train 3 steps with the real trainer (DeepSpeed ZeRO-3, CPU); return its exported model dir."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MLFLOW_DISABLE_TELEMETRY="true",
               TOKENIZERS_PARALLELISM="false", TORCH_EXTENSIONS_DIR=str(ROOT / ".cache" / "torch_extensions"))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        env.pop(k, None)
    cmd = [sys.executable, str(ROOT / "pipeline" / "train.py"), "--config", str(ROOT / "configs" / "tiny-cpu.yaml"),
           f"data.train=[{world / 'rag_train'},{world / 'el_train'}]", "data.eval=[]", "optim.max_steps=3",
           f"output_dir={out}", "checkpoint_every=100", *TINY]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        raise AssertionError(f"training failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return out / "model"


def _once(key: str, build) -> Path:
    if key not in _BUILT:
        _BUILT[key] = build()
    return _BUILT[key]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    base = _base(tmp_path_factory)
    return _once("world", lambda: build_world(base / "world"))


@pytest.fixture(scope="module")
def random_model(world, tmp_path_factory) -> Path:
    base = _base(tmp_path_factory)
    return _once("random", lambda: export_random_model(world, base / "random_model", seed=0))


@pytest.fixture(scope="module")
def other_model(world, tmp_path_factory) -> Path:
    """A second checkpoint (other weights, same tokenizer): its vectors live in another space."""
    base = _base(tmp_path_factory)
    return _once("other", lambda: export_random_model(world, base / "other_model", seed=1))


@pytest.fixture(scope="module")
def trained_model(world, tmp_path_factory) -> Path:
    base = _base(tmp_path_factory)
    return _once("trained", lambda: train_model(world, base / "train_run"))


def decoder_call_counter(rt):
    """Count the base transformer's forwards (and tokens fed) with a forward pre-hook; returns (stats, handle)."""
    stats = {"calls": 0, "tokens": 0}

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        stats["calls"] += 1
        stats["tokens"] += int(ids.shape[1])

    handle = rt.decoder.register_forward_pre_hook(hook, with_kwargs=True)
    return stats, handle
