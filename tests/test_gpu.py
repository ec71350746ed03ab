"""GPU-only tests (``pytest -m gpu tests/test_gpu.py``; bench/gpu_smoke.sh runs them). On a machine
without CUDA every test skips with that reason; the flash-attn tests skip when flash-attn is not
installed, and FAIL (never skip) when it is installed but does not load: that is the broken install
the trainer refuses too (onegen/devices.py).

1. flash-attn and sdpa give the same last-layer states at RET positions (padded batches, bf16,
   Qwen2 and Llama built from a config): cosine >= 0.999.
2. Batched decoding under flash-attn (one KV cache whose holes are masked out) gives the batch-1
   tokens, as tests/test_eval_generate.py checks on CPU with sdpa.
3. DeepSpeed ZeRO-3 in bf16 (attention auto: flash-attn when installed) trains, checkpoints, resumes
   and exports on one GPU; the export loads and answers.
4. faiss on the GPU (flat and IVF) gives the CPU index's top-1 on the same vectors.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from tests.eval_fixtures import random_model, world  # noqa: F401  (fixtures)
from tests.train_fixtures import make_world, run, train_cmd

CUDA = torch.cuda.is_available()
BF16 = CUDA and torch.cuda.is_bf16_supported()
FLASH_INSTALLED = importlib.util.find_spec("flash_attn") is not None


def _faiss_gpus() -> int:
    try:
        import faiss
    except ImportError:
        return 0
    return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0


FAISS_GPUS = _faiss_gpus() if CUDA else 0

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU: torch.cuda.is_available() is False here")]
needs_bf16 = pytest.mark.skipif(CUDA and not BF16, reason="needs a GPU with bf16 (Ampere or newer)")
needs_flash = pytest.mark.skipif(CUDA and not FLASH_INSTALLED,
                                 reason="flash-attn is not installed (pip install flash-attn --no-build-isolation; docs/gpu.md)")
needs_faiss_gpu = pytest.mark.skipif(CUDA and FAISS_GPUS == 0,
                                     reason="faiss sees no GPU (faiss-cpu installed? pip install 'faiss-gpu>=1.14.3')")

COSINE = 0.999
TIE = 0.05  # a decision whose two candidates' logits differ by < 5% of the logits' spread is a float tie
RET_TIE = 5e-3  # retrieval scores (cosines) closer than this are a tie


def _assert_flash_loads() -> None:
    from onegen.devices import flash_attn_problem

    problem = flash_attn_problem()
    assert problem is None, f"flash-attn is installed but cannot run: {problem}"


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return (a * b).sum(-1)


# ---- 1. flash-attn vs sdpa ---------------------------------------------------------------------

@needs_bf16
@needs_flash
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_flash_and_sdpa_give_the_same_states_at_ret_positions(world, arch):  # noqa: F811
    from transformers import AutoTokenizer

    from onegen.tokens import SpecialTokens
    from pipeline.config import ModelConfig
    from pipeline.data import open_prepared
    from onegen.hidden import encode_documents, query_vectors
    from pipeline.model import build_model

    _assert_flash_loads()
    tok = AutoTokenizer.from_pretrained(str(world / "tokenizer"), local_files_only=True)
    models = {}
    for attn in ("sdpa", "flash_attention_2"):
        # head_dim 64, grouped-query attention (4 heads, 2 kv heads) as in Qwen2
        cfg = ModelConfig(architecture=arch, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4,
                          num_key_value_heads=2, max_position_embeddings=1024, dtype="bf16", attn_implementation=attn)
        models[attn] = build_model(cfg, tok, seed=0, init_new_tokens=SpecialTokens()).to("cuda").eval()
    models["flash_attention_2"].load_state_dict(models["sdpa"].state_dict())  # the same weights, whatever the init
    assert models["flash_attention_2"].config._attn_implementation == "flash_attention_2"
    assert models["sdpa"].config._attn_implementation == "sdpa"
    assert models["sdpa"].dtype == torch.bfloat16

    data = open_prepared(world / "rag_dev")
    rows = data.query_rows(list(range(min(16, len(data)))))  # different lengths: padded batches
    assert len({len(r["input_ids"]) for r in rows}) > 1
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    doc_ids = sorted({d for r in rows for d in r["positives"]})
    docs = [d["input_ids"] for d in data.doc_rows(doc_ids)]
    out = {}
    for attn, m in models.items():
        q = query_vectors(m, [r["input_ids"] for r in rows], [r["roles"] for r in rows], pad, batch_size=8)
        out[attn] = (np.concatenate(q), encode_documents(m, docs, pad, batch_size=8))
    (qs, ds), (qf, df) = out["sdpa"], out["flash_attention_2"]
    assert qs.shape == qf.shape and qs.shape[0] >= len(rows)  # every row has at least one [RQ]
    cq, cd = _cosines(qs, qf), _cosines(ds, df)
    assert cq.min() >= COSINE, f"{arch}: query states, min cosine {cq.min():.5f} (mean {cq.mean():.5f})"
    assert cd.min() >= COSINE, f"{arch}: document states, min cosine {cd.min():.5f} (mean {cd.mean():.5f})"
    # The states differ between rows (a model whose every state is the same would pass the above).
    assert _cosines(qs[:1].repeat(len(qs), 0), qs).min() < 0.99


# ---- 2. batched decoding under flash-attn ----------------------------------------------------------

def _first_difference(a: list[int], b: list[int]) -> int | None:
    for j, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return j
    return None if len(a) == len(b) else min(len(a), len(b))


def _paragraph_hop(rt, result, ctx_index: int) -> int | None:
    """The hop whose inserted <paragraph>...</paragraph> holds context position ``ctx_index``, if any."""
    context = result.prompt_tokens * [None] + list(result.output_ids)
    for h, hop in enumerate(result.hops):
        start = hop.position + 1
        end = start
        while end < len(context) and context[end] != rt.ids["para_close"]:
            end += 1
        if start <= ctx_index <= end:
            return h
    return None


def _tie_at_divergence(rt, row: dict, a, b, j: int) -> tuple[bool, str]:
    """Is the first difference of batch-1 result ``a`` and batched ``b`` (output position ``j``) a float tie?"""
    prompt = list(row["input_ids"][: int(row["prompt_len"])])
    ctx = len(prompt) + j
    h = _paragraph_hop(rt, a, ctx)
    if h is not None:  # another document was inserted: the retrieval scores decide
        scores = [s for _, s in a.hops[h].retrieved[:2]]
        gap = scores[0] - scores[1] if len(scores) == 2 else float("inf")
        return gap < RET_TIE, f"hop {h}: inserted {a.hops[h].inserted} vs {b.hops[h].inserted if h < len(b.hops) else None}, score gap {gap:.5f}"
    if j >= len(a.output_ids) or j >= len(b.output_ids):
        return False, f"one run stopped at {j} tokens ({a.stop_reason} / {b.stop_reason})"
    x, y = a.output_ids[j], b.output_ids[j]
    ids = torch.tensor([prompt + list(a.output_ids[:j])], device=rt.device)
    with torch.no_grad():  # a fresh forward of the batch-1 context: the logits of that decision
        last = rt.decoder(input_ids=ids, use_cache=False).last_hidden_state[0, -1]
        logits = rt.model.get_output_embeddings()(last).float()
    margin = abs(float(logits[x] - logits[y])) / float(logits.std())
    return margin < TIE, f"token {x} vs {y} at output position {j}: logit gap {margin:.4f} x the logits' spread"


@needs_bf16
@needs_flash
def test_batched_decoding_under_flash_gives_the_batch_1_tokens(random_model, world, tmp_path):  # noqa: F811
    from evaluation.generate import GenerationConfig, answer_row, run_questions
    from evaluation.index import build_index, open_index
    from evaluation.retrievers import OneGenRetriever
    from evaluation.runtime import load_runtime
    from pipeline.data import open_prepared

    _assert_flash_loads()
    data = open_prepared(world / "rag_dev")
    rt = load_runtime(random_model, data, device="cuda", dtype="bf16", attn="flash_attention_2")
    assert rt.model.config._attn_implementation == "flash_attention_2" and rt.model.dtype == torch.bfloat16
    build_index(random_model, world / "rag_dev", tmp_path / "index", runtime=rt, progress=False)
    idx = open_index(tmp_path / "index", random_model)
    indices = [0, 3, 5, 6, 7]
    rows = data.query_rows(indices)
    assert len({r["prompt_len"] for r in rows}) > 1  # contexts of different lengths: holes in the shared cache
    cfg = GenerationConfig(max_new_tokens=14, max_hops=2, force_retrieval_every=3, k=4)
    alone = [answer_row(rt, row, OneGenRetriever(idx), cfg) for row in rows]
    together = run_questions(rt, OneGenRetriever(idx), GenerationConfig(**{**cfg.__dict__, "batch_size": 3}), indices,
                             progress=False)
    assert [r.example_id for r in together] == [r.example_id for r in alone]
    same, ties, total = 0, [], sum(len(a.output_ids) for a in alone)
    for row, a, b in zip(rows, alone, together):
        j = _first_difference(a.output_ids, b.output_ids)
        ctx_j = a.prompt_tokens + (len(a.output_ids) if j is None else j)
        flipped = None if j is None else _paragraph_hop(rt, a, ctx_j)
        for h, (ha, hb) in enumerate(zip(a.hops, b.hops)):
            if ha.position >= ctx_j:
                break
            # The [RQ] state is the same up to bf16 rounding, even where a tie then inserts another document.
            assert ha.position == hb.position, (a.example_id, h)
            assert float(_cosines(ha.query[None], hb.query[None])[0]) >= COSINE, (a.example_id, h)
            if h != flipped:
                assert ha.inserted == hb.inserted, (a.example_id, h, ha.retrieved, hb.retrieved)
        if j is None:
            assert (a.stop_reason, a.n_generated, a.context_tokens) == (b.stop_reason, b.n_generated, b.context_tokens)
            same += len(a.output_ids)
            continue
        tie, why = _tie_at_divergence(rt, row, a, b, j)
        assert tie, f"{a.example_id}: batched decoding under flash-attn left the batch-1 result, not at a tie: {why}"
        ties.append(f"{a.example_id}: {why}")
        same += j
    # Ties are rare (bf16 rounding must land on a near-equal pair): most tokens are compared exactly.
    assert same >= 0.6 * total, f"only {same}/{total} tokens compared before float ties: {ties}"
    assert len(ties) <= 2, ties


# ---- 3. ZeRO-3 bf16 on one GPU ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def train_world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("gpu-world") / "world")


def _metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


@needs_bf16
def test_zero3_bf16_train_resume_export_on_one_gpu(train_world, tmp_path):
    from safetensors import safe_open
    from transformers import AutoTokenizer

    from evaluation.generate import GenerationConfig, answer_row
    from evaluation.index import build_index, open_index
    from evaluation.retrievers import OneGenRetriever
    from evaluation.runtime import load_runtime
    from onegen.tokens import SpecialTokens
    from pipeline.data import open_prepared

    if FLASH_INSTALLED:
        _assert_flash_loads()
    out = tmp_path / "run"
    over = ["model.dtype=bf16", "model.attn_implementation=auto", "optim.micro_batch_size=4", "checkpoint_every=2"]
    first = run(train_cmd("python", train_world, out, "optim.max_steps=4", *over), timeout=900)
    attn = "flash_attention_2" if FLASH_INSTALLED else "sdpa"
    assert "ZeRO-3" in first.stdout and f"· {attn} (" in first.stdout, first.stdout[-3000:]
    assert "[train] done: step 4" in first.stdout
    assert (out / "checkpoints" / "step-000004" / "COMPLETE").is_file()
    m = _metrics(out)
    assert [r["step"] for r in m] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) and r["peak_mem_mb"] > 0 and r["tokens_per_s"] > 0 for r in m), m

    second = run(train_cmd("python", train_world, out, "optim.max_steps=6", *over), timeout=900)
    assert "resuming from step-000004" in second.stdout, second.stdout[-3000:]
    m = _metrics(out)
    assert [r["step"] for r in m] == [1, 2, 3, 4, 5, 6] and all(np.isfinite(r["loss"]) for r in m)

    model_dir = out / "model"
    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    assert all(t in tok.get_vocab() for t in SpecialTokens().all_tokens())
    weights = sorted(model_dir.glob("*.safetensors"))
    assert weights
    with safe_open(str(weights[0]), framework="pt") as f:  # the gathered 16-bit weights of ZeRO-3
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    assert dtypes == {torch.bfloat16}, dtypes
    # The export loads on the GPU with the attention training used, and answers with its own index.
    data = open_prepared(train_world / "rag_dev")
    rt = load_runtime(model_dir, data, device="cuda", dtype="bf16", attn="auto")
    assert rt.model.config._attn_implementation == attn
    assert rt.model.get_input_embeddings().weight.shape[0] >= len(tok)
    build_index(model_dir, train_world / "rag_dev", tmp_path / "index", runtime=rt, progress=False)
    idx = open_index(tmp_path / "index", model_dir)
    cfg = GenerationConfig(force_new_tokens=8, force_retrieval_every=3, max_hops=1)  # EOS masked: a fixed shape
    r = answer_row(rt, data.query_rows([0])[0], OneGenRetriever(idx), cfg)
    assert (r.n_generated, r.stop_reason, len(r.hops)) == (8, "forced_length", 1)
    assert r.hops[0].inserted is not None and np.isfinite(r.hops[0].query).all()


# ---- 4. faiss on the GPU ------------------------------------------------------------------------

def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@needs_faiss_gpu
def test_faiss_gpu_flat_and_ivf_give_the_cpu_top1():
    import faiss

    rng = np.random.default_rng(0)
    db = _unit(rng.standard_normal((5000, 64)))
    q = _unit(db[:300] + 0.05 * rng.standard_normal((300, 64)))
    res = faiss.StandardGpuResources()

    flat = faiss.IndexFlatIP(64)
    flat.add(db)
    _, cpu_ids = flat.search(q, 5)
    _, gpu_ids = faiss.index_cpu_to_gpu(res, 0, flat).search(q, 5)
    assert (cpu_ids[:, 0] == np.arange(300)).all()  # each query's own source vector
    assert (gpu_ids[:, 0] == cpu_ids[:, 0]).all()

    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(64), 64, 50, faiss.METRIC_INNER_PRODUCT)
    ivf.train(db)
    ivf.add(db)
    ivf.nprobe = 8
    _, cpu_ids = ivf.search(q, 5)
    gpu = faiss.index_cpu_to_gpu(res, 0, ivf)
    gpu.nprobe = 8  # the same lists visited
    _, gpu_ids = gpu.search(q, 5)
    assert (gpu_ids[:, 0] == cpu_ids[:, 0]).all(), int((gpu_ids[:, 0] != cpu_ids[:, 0]).sum())
    assert (cpu_ids[:, 0] == np.arange(300)).mean() > 0.9  # and IVF finds nearly every source


@needs_faiss_gpu
@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_project_index_on_gpu_gives_the_cpu_top1(random_model, world, tmp_path, kind):  # noqa: F811
    """evaluation.index: built with the GPUs (IVF trains there), searched on GPU and on CPU: same top-1."""
    from evaluation.index import build_index, open_index

    # fp32 + sdpa: this test is about faiss, not about the attention kernel.
    man = build_index(random_model, world / "rag_dev", tmp_path / kind, kind=kind, device="cuda", dtype="fp32",
                      attn="sdpa", progress=False)
    assert man["params"]["built_on_gpu"] is (kind == "ivf"), man["params"]  # only ivf gains from a GPU build
    cpu = open_index(tmp_path / kind, random_model, use_gpu=False)
    gpu = open_index(tmp_path / kind, random_model, use_gpu=True)
    rng = np.random.default_rng(1)
    emb = np.asarray(cpu.embeddings, dtype=np.float32)
    q = _unit(emb[:100] + 0.01 * rng.standard_normal(emb[:100].shape))
    c, g = cpu.search(q, 2), gpu.search(q, 2)
    clear = [i for i in range(len(q)) if len(c[i]) < 2 or c[i][0][1] - c[i][1][1] > 1e-4]  # no score ties
    assert len(clear) > 50
    assert [c[i][0][0] for i in clear] == [g[i][0][0] for i in clear]
    np.testing.assert_allclose([c[i][0][1] for i in clear], [g[i][0][1] for i in clear], atol=1e-4)
