"""The GPU path of evaluation, checked on CPU: ``--dtype`` / ``--attn`` (resolved, printed, in the index
manifest and the MLflow params, compared by the index reuse check, flash + fp32 refused before loading),
bf16 document vectors close to fp32's, faiss sharded across GPUs with fp16 by flag (a stand-in faiss
with two emulated GPUs), and the separate encoders on the GPU when torch sees one."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from evaluation import index as index_mod
import typing

from evaluation.cli import _config, _parser, main
from evaluation.config import Attn, Dtype
from evaluation.config import IndexParams
from evaluation.index import build_index, gpu_cloner_options, open_index
from evaluation.precision import resolve_precision
from evaluation.index_reuse import existing_index_ok
from evaluation.runtime import load_runtime
from onegen import devices
from onegen.errors import ConfigError
from tests.eval_fixtures import random_model, world  # noqa: F401


def _manifest(d) -> dict:
    return json.loads((d / "manifest.json").read_text())


# ---- flags ---------------------------------------------------------------------------------------


def test_cli_choices_are_those_of_onegen_devices():
    assert list(typing.get_args(Dtype)) == ["auto", *devices.DTYPES]
    assert list(typing.get_args(Attn)) == list(devices.ATTENTIONS)


@pytest.mark.parametrize("cmd", ["index", "run"])
def test_flags_parse_and_help_states_the_default(cmd, capsys):
    base = ["--model", "M", "--data", "D"] + (["--out", "O"] if cmd == "index" else [])
    cfg = _config(_parser().parse_args([cmd, *base]))
    assert (cfg.dtype, cfg.attn, cfg.faiss.faiss_fp16) == ("auto", "auto", False)
    cfg = _config(_parser().parse_args([cmd, *base, "--dtype", "bf16", "--attn", "flash_attention_2", "--faiss-fp16"]))
    assert (cfg.dtype, cfg.attn, cfg.faiss.faiss_fp16) == ("bf16", "flash_attention_2", True)
    with pytest.raises(SystemExit):
        _parser().parse_args([cmd, *base, "--dtype", "fp64"])
    with pytest.raises(SystemExit):
        _parser().parse_args([cmd, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for words in ("--dtype", "--attn", "--faiss-fp16", "bf16 on a CUDA GPU", "else fp32", "flash_attention_2 on CUDA",
                  "else sdpa", "sharded"):
        assert words in text, words


def test_cpu_auto_is_fp32_sdpa_and_flash_with_fp32_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    p = resolve_precision()
    assert (p.device, p.dtype, p.attn) == ("cpu", torch.float32, "sdpa") and p.attn_reason == "no CUDA device"
    assert resolve_precision("cpu", "bf16", "eager").record() == {"dtype": "bf16", "attn": "eager",
                                                                 "attn_reason": "asked for", "device": "cpu"}
    assert resolve_precision("cpu", torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="needs dtype bf16 or fp16, not fp32"):
        resolve_precision("cpu", "fp32", "flash_attention_2")


def test_auto_on_cuda_is_bf16(monkeypatch):
    """On a bf16-capable GPU without flash-attn, auto = bf16 + sdpa, with the reason (nothing moves to CUDA)."""
    import importlib.util

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "flash_attn" else real_find_spec(n, *a))
    p = resolve_precision()
    assert (p.device, p.dtype, p.attn) == ("cuda", torch.bfloat16, "sdpa") and "not installed" in p.attn_reason
    assert resolve_precision("cpu").dtype == torch.float32  # --device cpu on a GPU machine: fp32


# ---- the model in another precision ----------------------------------------------------------------


def test_load_runtime_dtype_and_attention(random_model):  # noqa: F811
    rt = load_runtime(random_model, device="cpu")
    assert next(rt.model.parameters()).dtype == torch.float32 and rt.model.config._attn_implementation == "sdpa"
    assert rt.precision_record()["dtype"] == "fp32"
    rt = load_runtime(random_model, device="cpu", dtype="bf16", attn="eager")
    assert next(rt.model.parameters()).dtype == torch.bfloat16 and rt.model.config._attn_implementation == "eager"
    assert rt.precision_record() == {"dtype": "bf16", "attn": "eager", "attn_reason": "asked for", "device": "cpu"}


def test_export_load_model_defaults_unchanged(random_model):  # noqa: F811
    from onegen.model_io import load_model

    model, _ = load_model(random_model)
    assert next(model.parameters()).dtype == torch.float32 and model.config._attn_implementation == "sdpa"


def test_bf16_index_is_float32_and_close_to_fp32(random_model, world, tmp_path):  # noqa: F811
    m32 = build_index(random_model, world / "rag_dev", tmp_path / "fp32", dtype="fp32", progress=False)
    m16 = build_index(random_model, world / "rag_dev", tmp_path / "bf16", dtype="bf16", progress=False)
    assert (m32["dtype"], m32["attn"]) == ("fp32", "sdpa") and (m16["dtype"], m16["attn"]) == ("bf16", "sdpa")
    assert m16["attn_reason"] and m16["device"] == "cpu" and m16["faiss_gpu"] == {"shard": True, "fp16": False}
    a, b = (np.load(tmp_path / d / "embeddings.npy", allow_pickle=False) for d in ("fp32", "bf16"))
    assert a.dtype == b.dtype == np.float32 and a.shape == b.shape
    cos = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.min() >= 0.99, cos.min()
    assert not np.array_equal(a, b)  # bf16 really ran
    idx = open_index(tmp_path / "bf16", random_model)
    assert [h[0][0] for h in idx.search(b[:5], k=1)] == idx.doc_ids[:5]


def test_reuse_check_compares_dtype_and_attention(random_model, world, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "idx"
    args = ["index", "--model", str(random_model), "--data", str(world / "rag_dev"), "--out", str(out), "--quiet"]
    assert main(args + ["--dtype", "fp32"]) == 0
    text = capsys.readouterr().out
    assert "precision: fp32, attention sdpa (no CUDA device), on cpu" in text and "built" in text
    assert main(args) == 0  # auto on CPU = fp32 + sdpa: reused
    assert "reused" in capsys.readouterr().out
    assert main(args + ["--dtype", "bf16"]) == 0
    text = capsys.readouterr().out
    assert "rebuilding, it was built with dtype fp32, this run uses bf16" in text and "bf16 + sdpa" in text
    assert _manifest(out)["dtype"] == "bf16"
    assert main(args + ["--dtype", "bf16", "--attn", "eager"]) == 0
    assert "rebuilding, it was built with attn sdpa, this run uses eager" in capsys.readouterr().out
    # fp16 GPU storage is a search option, not a build input: reused, and said so.
    assert main(args + ["--dtype", "bf16", "--attn", "eager", "--faiss-fp16"]) == 0
    text = capsys.readouterr().out
    assert "reused" in text and "chosen when the index is searched" in text
    # An index written before precision was recorded was fp32 + sdpa.
    man = _manifest(out)
    legacy = {k: v for k, v in man.items() if k not in ("dtype", "attn", "attn_reason", "device")}
    (out / "manifest.json").write_text(json.dumps(legacy))
    fps = (man["model_fingerprint"], man["prepared_fingerprint"], "flat")
    assert existing_index_ok(out, *fps, {"dtype": "fp32", "attn": "sdpa"}) == (True, "complete")
    assert existing_index_ok(out, *fps, {"dtype": "bf16", "attn": "sdpa"})[0] is False


@pytest.mark.parametrize("cmd", ["index", "run"])
def test_flash_with_fp32_is_refused_before_the_model_loads(cmd, random_model, world, tmp_path, monkeypatch, capsys):  # noqa: F811
    import evaluation.runtime

    def never(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(evaluation.runtime, "load_model", never)
    out = tmp_path / "out"
    argv = [cmd, "--model", str(random_model), "--data", str(world / "rag_dev"), "--out", str(out), "--dtype", "fp32",
            "--attn", "flash_attention_2", "--quiet"] + (["--no-mlflow"] if cmd == "run" else [])
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: attention flash_attention_2 needs dtype bf16 or fp16, not fp32") and "\n" not in err
    assert not out.exists()


def test_run_logs_precision_in_mlflow_and_manifests(random_model, world, tmp_path, capsys):  # noqa: F811
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "res"
    assert main(["run", "--model", str(random_model), "--data", str(world / "rag_dev"), "--method", "onegen",
                 "--max-examples", "2", "--max-new-tokens", "6", "--force-retrieval-every", "3", "--max-hops", "1",
                 "--dtype", "bf16", "--out", str(out), "--tracking-uri", uri, "--quiet"]) == 0
    assert "precision: bf16, attention sdpa (no CUDA device), on cpu" in capsys.readouterr().out
    run_id = _manifest(out)["mlflow_run_id"]
    params = MlflowClient(tracking_uri=uri).get_run(run_id).data.params
    assert (params["dtype"], params["attn"], params["attn_reason"]) == ("bf16", "sdpa", "no CUDA device")
    assert (params["index_dtype"], params["index_attn"], params["faiss_fp16"]) == ("bf16", "sdpa", "False")
    assert params["device"] == "cpu" and "faiss_gpu" not in params  # faiss-cpu: no GPU options used
    assert _manifest(out / "index")["dtype"] == "bf16" and _manifest(out)["dtype"] == "bf16"


# ---- faiss on several GPUs (a stand-in faiss: two emulated GPUs made of CPU indexes) ------------------


def test_cloner_options_shard_and_fp16():
    import faiss

    made = []

    def options():
        made.append(SimpleNamespace(shard=False, useFloat16=False, useFloat16CoarseQuantizer=True))
        return made[-1]

    stand_in = SimpleNamespace(GpuMultipleClonerOptions=options)
    for fp16 in (False, True):
        co = gpu_cloner_options(fp16, stand_in)
        assert co is made[-1] and co.shard is True and co.useFloat16 is fp16 and co.useFloat16CoarseQuantizer is False
    if hasattr(faiss, "GpuMultipleClonerOptions"):  # faiss-gpu: the real options object too
        co = gpu_cloner_options(True)
        assert co.shard and co.useFloat16


class TwoGpuFaiss:
    """The real faiss, plus the GPU calls evaluation.index makes, emulated with CPU ``IndexShards`` the
    way faiss-gpu's ToGpuClonerMultiple shards (flat: id ranges, successive ids; ivf: copies sharing
    the trained quantizer, ids kept or assigned by the shards) and index_gpu_to_cpu merges them."""

    def __init__(self):
        import faiss

        self._faiss = faiss
        self.calls: list[SimpleNamespace] = []
        self.keep: list = []  # the shards' Python objects (faiss indexes hold raw pointers)

    def __getattr__(self, name):
        return getattr(self._faiss, name)

    def GpuMultipleClonerOptions(self):  # noqa: N802 (faiss's name)
        return SimpleNamespace(shard=False, useFloat16=False, useFloat16CoarseQuantizer=True)

    def get_num_gpus(self):
        return 2

    def index_cpu_to_all_gpus(self, index, co=None, ngpu=-1):
        f = self._faiss
        assert co is not None and co.shard, "replicas: every GPU would hold the whole index"
        self.calls.append(co)
        index = f.downcast_index(index)
        ivf = isinstance(index, f.IndexIVFFlat)
        res = f.IndexShards(index.d, False, not ivf)
        for i in range(2):
            if ivf:
                quantizer = f.clone_index(index.quantizer)  # a GPU shard holds its own copy
                self.keep.append(quantizer)
                sub = f.IndexIVFFlat(quantizer, index.d, index.nlist, index.metric_type)
                sub.is_trained, sub.nprobe = index.is_trained, index.nprobe
                if index.ntotal:  # faiss-gpu's default shard_type 1: ids modulo the shard count
                    index.copy_subset_to(sub, f.InvertedLists.SUBSET_TYPE_ID_MOD, 2, i)
            else:
                sub = f.IndexFlat(index.d, index.metric_type)
                lo, hi = index.ntotal * i // 2, index.ntotal * (i + 1) // 2
                if hi > lo:
                    sub.add(index.reconstruct_n(lo, hi - lo))
            self.keep.append(sub)
            res.add_shard(sub)
        return res

    def index_gpu_to_cpu(self, index):
        f = self._faiss
        subs = [f.downcast_index(index.at(i)) for i in range(index.count())]
        out = f.clone_index(subs[0])
        for s in subs[1:]:
            if isinstance(out, f.IndexIVFFlat):
                out.merge_from(s, 0)
            else:
                out.add(s.reconstruct_n(0, s.ntotal))
        return out


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_gpu_build_and_open_are_sharded_with_fp16_by_flag(kind, random_model, world, tmp_path, monkeypatch):  # noqa: F811
    fake = TwoGpuFaiss()
    monkeypatch.setattr(index_mod, "_faiss", lambda: fake)
    monkeypatch.setattr(index_mod, "faiss_has_gpu", lambda: True)
    monkeypatch.setattr(index_mod, "ADD_CHUNK", 7)  # several adds into the sharded index
    out = tmp_path / kind
    man = build_index(random_model, world / "el_dev", out, kind=kind, params=IndexParams(nlist=4, faiss_fp16=True),
                      progress=False)
    assert man["faiss_gpu"] == {"shard": True, "fp16": True}
    if kind == "ivf":  # trained (k-means on the GPUs) and filled on the GPUs, sharded
        assert man["params"]["built_on_gpu"] and man["params"]["gpu"] == {"shard": True, "fp16": True, "gpus": 2}
        assert len(fake.calls) == 2 and not fake.calls[0].useFloat16 and fake.calls[1].useFloat16
    else:  # a flat add is a copy: done on the CPU
        assert not man["params"]["built_on_gpu"] and not fake.calls
    assert all(co.shard and not co.useFloat16CoarseQuantizer for co in fake.calls)
    fake.calls.clear()

    idx = open_index(out, random_model)  # the manifest's fp16 by default
    assert idx.gpu == {"shard": True, "fp16": True, "gpus": 2} and fake.calls[-1].useFloat16
    emb = np.asarray(idx.embeddings)
    hits = idx.search(emb, k=1)
    assert np.mean([h[0][0] == d for h, d in zip(hits, idx.doc_ids)]) > 0.9  # duplicates of a name may tie
    assert open_index(out, random_model, fp16=False).gpu["fp16"] is False and not fake.calls[-1].useFloat16
    assert open_index(out, random_model, use_gpu=False).gpu is None


# ---- the separate encoders -------------------------------------------------------------------------


def test_encoders_choose_cuda_when_torch_sees_it(monkeypatch):
    from data_prep import encoders
    from data_prep.encoders import MeanPoolEncoder, default_minilm_path, encoder_device

    moved = []
    real_to = torch.nn.Module.to
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: moved.append(str(a[0])) or self)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert encoder_device() == "cuda" and encoder_device("cpu") == "cpu"
    enc = MeanPoolEncoder(default_minilm_path())
    assert enc.device == "cuda" and moved == ["cuda"]
    assert MeanPoolEncoder(default_minilm_path(), device="cpu").device == "cpu"

    # A worker forked after the parent put the model on CUDA cannot use CUDA: it encodes with a CPU copy.
    monkeypatch.setattr(torch.nn.Module, "to", real_to)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(encoders, "_cuda_unusable_here", lambda: True)
    texts = ["a feline pet", "a programming language"]
    got = enc.encode(texts)
    want = MeanPoolEncoder(default_minilm_path(), device="cpu").encode(texts)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert enc.device == "cuda"  # the parent's model is left alone


def test_dense_miner_and_minilm_baseline_follow_the_gpu(monkeypatch):
    from data_prep import encoders
    from data_prep.mining import MiningConfig, NegativeMiner
    from data_prep.records import Document
    from evaluation.retrievers import DenseRetriever, build_retriever

    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: self)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    miner = NegativeMiner({}, MiningConfig(bm25=False, dense=True))
    assert miner.encoder.device == "cuda"

    made = []

    class Recorder:
        def __init__(self, path, max_length=None, device=None):
            made.append(device)

        def encode(self, texts, batch_size=64):
            return np.eye(len(texts), 4, dtype=np.float32)

    monkeypatch.setattr(encoders, "MeanPoolEncoder", Recorder)
    docs = [Document("d1", "T", "x"), Document("d2", "U", "y")]
    on_gpu = SimpleNamespace(model=SimpleNamespace(parameters=lambda: iter([SimpleNamespace(device="cuda:0")])))
    assert isinstance(build_retriever("dense", on_gpu, docs=docs), DenseRetriever) and made == ["cuda:0"]
    build_retriever("dense", SimpleNamespace(model=None), docs=docs)
    build_retriever("dense", on_gpu, docs=docs, device="cpu")
    assert made == ["cuda:0", "cuda", "cpu"]
