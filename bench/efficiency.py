"""Inference efficiency, the paper's Figure 3: one-pass (OneGen) vs two-pass vs pipeline, per dialogue.

    python bench/efficiency.py                           # tiny Llama built in-process (hidden 256 x 4 layers)
    python bench/efficiency.py --model runs/tiny-cpu/model --repeats 5
    python bench/efficiency.py --quick                   # seconds (what tests/test_efficiency_bench.py runs)

Setup (the paper's): a dialogue of 5 rounds in ONE context (``evaluation.generate.run_dialogue``);
each round asks a fresh question of Q tokens, the model outputs 10 tokens (plus its ``[RQ]`` tokens),
and each retrieval inserts a document of 30 tokens as ``<paragraph>…</paragraph>``. Decoding is
forced (``GenerationConfig.force_new_tokens`` / ``force_retrieval_every`` / ``paragraph_budget``) so
every method does identical generation work and only the retrieval differs:

* one-pass  ``OneGenRetriever``: the state the generator already computed at ``[RQ]`` is the query;
* two-pass  ``TwoPassRetriever``: the same model re-encodes the context up to ``[RQ]`` in a second
  forward (GritLM-style) — its cost grows with the context;
* pipeline  ``DenseRetriever`` (all-MiniLM-L6-v2): a separate encoder embeds question + generation
  so far; the same generator inserts the document.

Two sweeps, one process, one model: (a) question length Q in 32, 64, 128, 256, 512 tokens with one
retrieval per answer; (b) retrievals per answer 1..4 at Q = ``--fixed-query-tokens``. Each point:
a warm-up, then ``--repeats`` dialogues per method (methods interleaved), median wall time.
Writes ``efficiency.csv``, ``efficiency.png`` (two panels) and ``efficiency.json`` (setup) under
``--out``; prints the ratios (two-pass / one-pass, pipeline / one-pass) last.

torch, matplotlib and the modules that load torch are imported inside the functions that use them
(``# lazy``), so ``--help`` answers without them.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_prep.records import Document
from data_prep.tokenizer import train_bpe
from evaluation.index import DocIndex
from onegen.tokens import SpecialTokens, add_special_tokens
from pipeline.config import ModelConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

METHODS = ("one-pass", "two-pass", "pipeline")
CSV_COLUMNS = ["sweep", "query_tokens", "retrievals", "method", "median_s", "min_s", "max_s", "repeats",
               "context_tokens", "generator_forwards", "retriever_forwards", "ratio_vs_one_pass"]


@dataclass
class Setup:
    rounds: int = 5
    output_tokens: int = 10
    doc_tokens: int = 30


class BenchDocs:
    """``doc_id -> Document`` for the decoding loop (what ``Runtime.docs`` provides from a prepared dataset)."""

    def __init__(self, docs):
        self.by_id = {d.doc_id: d for d in docs}

    def get(self, doc_id):
        return self.by_id[doc_id]

    def all(self):
        return list(self.by_id.values())

    def __len__(self):
        return len(self.by_id)


def _words(rng: random.Random, n: int) -> list[str]:
    syll = ["ka", "lo", "mi", "ne", "ru", "ta", "vi", "so", "de", "ba", "fu", "gi", "ho", "ja", "pe", "zu"]
    return ["".join(rng.choice(syll) for _ in range(rng.randint(1, 3))) for _ in range(n)]


def build_tiny_runtime(hidden: int, layers: int, vocab: int, max_positions: int, device: str, seed: int = 0,
                       n_texts: int = 3000):
    """A randomly initialised tiny Llama + a BPE tokenizer trained here (no files, no hub), as a Runtime."""
    # lazy: see module docstring
    import torch

    from evaluation.runtime import Runtime, tagger_for  # lazy: as above
    from pipeline.model import build_model  # lazy: as above

    rng = random.Random(seed)
    texts = [" ".join(_words(rng, 30)) for _ in range(n_texts)]
    tok = train_bpe(texts, vocab)
    tokens = SpecialTokens()
    add_special_tokens(tok, tokens)
    heads = max(1, hidden // 64)
    cfg = ModelConfig(hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 16 * 16, num_layers=layers,
                      num_heads=heads, max_position_embeddings=max_positions, dtype="fp32", attn_implementation="sdpa")
    model = build_model(cfg, tok, seed=seed, init_new_tokens=tokens).to(device).eval()
    ocfg = {"special_tokens": tokens.to_dict(), "templates": {}, "mode": "random-init", "step": 0}
    tagger = tagger_for(tok, ocfg, None)
    ids = {k: tagger.tid(k) for k in SpecialTokens.KEYS}
    rt = Runtime(Path("<in-process>"), model, tok, tagger, ocfg, {"fingerprint": "in-process"}, None, None, ids)
    desc = f"tiny Llama in-process: hidden {hidden} x {layers} layers, {heads} heads, vocab {len(tok)}"
    with torch.no_grad():
        n_params = sum(p.numel() for p in model.parameters())
    return rt, desc, n_params


def load_checkpoint_runtime(model_dir: str, device: str):
    # lazy: see module docstring
    from evaluation.runtime import load_runtime

    rt = load_runtime(model_dir, None, device=device)
    n_params = sum(p.numel() for p in rt.model.parameters())
    return rt, f"checkpoint {model_dir} ({rt.onegen_config.get('mode')}, step {rt.onegen_config.get('step')})", n_params


def make_docs(rt, n: int, doc_tokens: int, rng: random.Random):
    """``n`` documents whose paragraph body has at least ``doc_tokens`` tokens (the budget cuts it to exactly that)."""
    docs = []
    for i in range(n):
        words = _words(rng, doc_tokens * 2)
        docs.append(Document(f"d{i}", " ".join(words[:2]), " ".join(words[2:])))
        assert len(rt.tagger.encode(rt.tagger.cfg.rag.paragraph.format(title=docs[-1].title, text=docs[-1].text))) >= doc_tokens
    return docs


def question_of(rt, n_tokens: int, rng: random.Random) -> str:
    """A question of (about) ``n_tokens`` tokens under the generator's tokenizer."""
    ids: list[int] = []
    while len(ids) < n_tokens:
        ids = rt.tagger.encode(" ".join(_words(rng, n_tokens * 2)))
    return rt.tokenizer.decode(ids[:n_tokens], skip_special_tokens=True).strip() + "?"


def dialogue_rows(rt, q_tokens: int, rounds: int, rng: random.Random) -> list[dict]:
    rows = []
    for i in range(rounds):
        q = question_of(rt, q_tokens, rng)
        ids = rt.tagger.rag_prompt(q)
        rows.append({"example_id": f"q{i}", "question": q, "input_ids": ids, "prompt_len": len(ids), "candidates": [],
                     "answers": [], "positives": []})
    return rows


def gen_config(setup: Setup, retrievals: int):
    """``output_tokens`` words + ``retrievals`` forced ``[RQ]`` spread evenly, 30-token documents, open search."""
    # lazy: see module docstring
    from evaluation.generate import GenerationConfig

    every = math.ceil(setup.output_tokens / (retrievals + 1))
    return GenerationConfig(force_new_tokens=setup.output_tokens + retrievals, force_retrieval_every=every,
                            max_hops=retrievals, paragraph_budget=setup.doc_tokens, setting="open", k=1)


def context_needed(rows: list[dict], setup: Setup, retrievals: int) -> int:
    per_hop = setup.doc_tokens + 2
    return sum(r["prompt_len"] + 1 + setup.output_tokens + retrievals * (1 + per_hop) for r in rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
    ap.add_argument("--model", help="exported checkpoint dir (default: a tiny model built in-process)")
    ap.add_argument("--hidden", type=int, default=256, help="in-process model: hidden size")
    ap.add_argument("--layers", type=int, default=4, help="in-process model: layers")
    ap.add_argument("--vocab", type=int, default=4000, help="in-process model: BPE vocabulary")
    ap.add_argument("--query-tokens", type=int, nargs="+", default=[32, 64, 128, 256, 512], help="sweep (a)")
    ap.add_argument("--retrievals", type=int, nargs="+", default=[1, 2, 3, 4], help="sweep (b)")
    ap.add_argument("--fixed-query-tokens", type=int, default=128, help="question length of sweep (b)")
    ap.add_argument("--rounds", type=int, default=5, help="dialogue rounds")
    ap.add_argument("--output-tokens", type=int, default=10, help="generated tokens per round ([RQ] not counted)")
    ap.add_argument("--doc-tokens", type=int, default=30, help="tokens of each inserted document")
    ap.add_argument("--docs", type=int, default=256, help="documents in the index")
    ap.add_argument("--repeats", type=int, default=5, help="timed dialogues per method and point (median)")
    ap.add_argument("--device", help="cpu / cuda (default: cuda when available)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/bench/efficiency", help="output dir (CSV, PNG, JSON)")
    ap.add_argument("--quick", action="store_true", help="tiny model (hidden 64 x 2), 2 points per sweep, 1 repeat, "
                                                        "1 torch thread (seconds; the test)")
    ns = ap.parse_args(argv)
    if ns.quick:
        ns.hidden, ns.layers, ns.vocab, ns.docs, ns.repeats = 64, 2, 1000, 32, 1
        ns.query_tokens, ns.retrievals, ns.fixed_query_tokens = [32, 64], [1, 2], 32
        ns.threads = ns.threads or 1
    return ns


@dataclass
class Bench:
    """What every timed dialogue shares: the generator runtime, its documents and the three retrievers."""

    rt: Any
    desc: str
    n_params: int
    docs: list
    retrievers: dict
    device: str
    setup: Setup


def build_bench(ns: argparse.Namespace, setup: Setup, rng: random.Random) -> Bench:
    """The model (a checkpoint or a tiny one built here), ``ns.docs`` documents, their index and the retrievers."""
    # lazy: see module docstring
    import torch

    from data_prep.encoders import MeanPoolEncoder, default_minilm_path  # lazy: as above
    from evaluation.retrievers import DenseRetriever, OneGenRetriever, TwoPassRetriever  # lazy: as above
    from evaluation.runtime import default_device  # lazy: as above
    from onegen.hidden import encode_documents  # lazy: as above

    if ns.threads:
        torch.set_num_threads(ns.threads)
    device = ns.device or default_device()
    max_q = max(ns.query_tokens + [ns.fixed_query_tokens])
    need_pos = ns.rounds * (max_q + 64 + ns.output_tokens + max(ns.retrievals) * (ns.doc_tokens + 3)) + 64
    t_setup = time.perf_counter()
    if ns.model:
        rt, desc, n_params = load_checkpoint_runtime(ns.model, device)
    else:
        rt, desc, n_params = build_tiny_runtime(ns.hidden, ns.layers, ns.vocab, max(4096, need_pos), device, ns.seed,
                                                n_texts=300 if ns.quick else 3000)
    docs = make_docs(rt, ns.docs, ns.doc_tokens, rng)
    rt.docs = BenchDocs(docs)  # type: ignore[assignment]
    # The model's own document index ([RD] states), as `python -m evaluation index` builds it.
    emb = encode_documents(rt.model, [rt.tagger.document_row(d).input_ids for d in docs], rt.pad_id)
    index = DocIndex.from_arrays([d.doc_id for d in docs], emb)
    encoder = MeanPoolEncoder(default_minilm_path(), device=device)
    retrievers = {"one-pass": OneGenRetriever(index), "two-pass": TwoPassRetriever(rt.model, rt.tokenizer, index, rt.tagger),
                  "pipeline": DenseRetriever(encoder, docs)}
    print(f"model: {desc} ({n_params / 1e6:.1f}M params) on {device}, torch threads {torch.get_num_threads()}; "
          f"pipeline encoder all-MiniLM-L6-v2 ({sum(p.numel() for p in encoder.model.parameters()) / 1e6:.1f}M params); "
          f"{len(docs)} docs; setup {time.perf_counter() - t_setup:.1f}s", flush=True)
    print(f"dialogue: {setup.rounds} rounds x ({setup.output_tokens} output tokens + [RQ]s), {setup.doc_tokens}-token "
          f"documents; {ns.repeats} repeats, median", flush=True)
    return Bench(rt, desc, n_params, docs, retrievers, device, setup)


def one_dialogue(bench: Bench, method: str, rows: list[dict], cfg, r: int):
    """Wall time and results of one dialogue with ``method``; checks it did the generation work of every method."""
    # lazy: see module docstring
    import torch

    from evaluation.generate import run_dialogue  # lazy: as above

    def sync():
        if bench.device.startswith("cuda"):
            torch.cuda.synchronize()

    setup = bench.setup
    sync()
    t0 = time.perf_counter()
    res = run_dialogue(bench.rt, rows, bench.retrievers[method], cfg)
    sync()
    dt = time.perf_counter() - t0
    for x in res:  # every method must have done the same generation work
        if x.n_generated != setup.output_tokens + r or len(x.hops) != r:
            raise AssertionError(f"{method}: round {x.round} generated {x.n_generated} tokens with {len(x.hops)} "
                                 f"retrievals; expected {setup.output_tokens + r} and {r}")
    return dt, res


def measure_point(bench: Bench, sweep: str, q: int, r: int, repeats: int, rng: random.Random) -> list[dict]:
    """One point of a sweep: a warm-up, then ``repeats`` dialogues per method (interleaved); a CSV record per method."""
    rt, setup = bench.rt, bench.setup
    rows = dialogue_rows(rt, q, setup.rounds, rng)
    if context_needed(rows, setup, r) > rt.max_positions:
        print(f"skip {sweep} Q={q} R={r}: the dialogue needs {context_needed(rows, setup, r)} positions, the model "
              f"has {rt.max_positions}", flush=True)
        return []
    cfg = gen_config(setup, r)
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    last: dict[str, list] = {}
    for m in METHODS:  # warm-up (allocator, caches)
        one_dialogue(bench, m, rows, cfg, r)
    for _ in range(repeats):
        for m in METHODS:
            dt, last[m] = one_dialogue(bench, m, rows, cfg, r)
            times[m].append(dt)
    base = statistics.median(times["one-pass"])
    records = []
    for m in METHODS:
        med = statistics.median(times[m])
        res = last[m]
        records.append({
            "sweep": sweep, "query_tokens": q, "retrievals": r, "method": m, "median_s": round(med, 6),
            "min_s": round(min(times[m]), 6), "max_s": round(max(times[m]), 6), "repeats": repeats,
            "context_tokens": res[-1].context_tokens,
            "generator_forwards": sum(x.decode_steps + x.prefills for x in res),
            "retriever_forwards": sum(x.retriever_forwards for x in res),
            "ratio_vs_one_pass": round(med / base, 4),
        })
    print(f"{sweep:>12} Q={q:<4} R={r}: " + "  ".join(
        f"{m} {statistics.median(times[m]) * 1000:8.1f} ms" for m in METHODS), flush=True)
    return records


def write_results(out: Path, records: list[dict], bench: Bench, ns: argparse.Namespace) -> Path:
    """``efficiency.csv`` and ``efficiency.json`` (the setup) under ``out``; returns the PNG's path."""
    # lazy: see module docstring
    import torch

    from data_prep.encoders import default_minilm_path  # lazy: as above

    setup = bench.setup
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "efficiency.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        w.writerows(records)
    (out / "efficiency.json").write_text(json.dumps({
        "model": bench.desc, "params": bench.n_params, "device": bench.device, "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
        "rounds": setup.rounds, "output_tokens": setup.output_tokens, "doc_tokens": setup.doc_tokens,
        "docs": len(bench.docs), "repeats": ns.repeats, "query_tokens": ns.query_tokens, "retrievals": ns.retrievals,
        "fixed_query_tokens": ns.fixed_query_tokens, "pipeline_encoder": str(default_minilm_path()),
    }, indent=2))
    return plot(records, out / "efficiency.png", bench.desc, setup, ns.fixed_query_tokens)


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    setup = Setup(ns.rounds, ns.output_tokens, ns.doc_tokens)
    rng = random.Random(ns.seed)
    bench = build_bench(ns, setup, rng)
    points = [("query_length", q, 1) for q in ns.query_tokens] + [("retrievals", ns.fixed_query_tokens, r) for r in ns.retrievals]
    records: list[dict] = []
    for sweep, q, r in points:
        records += measure_point(bench, sweep, q, r, ns.repeats, rng)
    out = Path(ns.out)
    png = write_results(out, records, bench, ns)
    print(f"\nwrote {out / 'efficiency.csv'}, {png}, {out / 'efficiency.json'}")
    print_ratios(records)
    return 0


def plot(records: list[dict], path: Path, desc: str, setup: Setup, fixed_q: int) -> Path:
    # lazy: see module docstring
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: as above

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    style = {"one-pass": ("#4C72B0", "o"), "two-pass": ("#DD8452", "s"), "pipeline": ("#55A868", "^")}
    for ax, sweep, xkey, xlabel, title in (
            (axes[0], "query_length", "query_tokens", "question length (tokens)", "(a) query length, 1 retrieval / answer"),
            (axes[1], "retrievals", "retrievals", "retrievals per answer", f"(b) retrievals, question {fixed_q} tokens")):
        for m in METHODS:
            pts = sorted((rec[xkey], rec["median_s"]) for rec in records if rec["sweep"] == sweep and rec["method"] == m)
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, label=m, color=style[m][0], marker=style[m][1])
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"seconds per {setup.rounds}-round dialogue (median)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend()
        if sweep == "query_length":
            ax.set_xscale("log", base=2)
        else:
            ax.set_xticks(sorted({rec[xkey] for rec in records if rec["sweep"] == sweep}) or [1])
    fig.suptitle(f"OneGen efficiency (Fig. 3 setup: {setup.output_tokens} output tokens / round, {setup.doc_tokens}-token "
                 f"docs, {setup.rounds} rounds) — {desc}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def print_ratios(records: list[dict]) -> None:
    by = {(r["sweep"], r["query_tokens"], r["retrievals"], r["method"]): r for r in records}
    print("\nratios of median wall time per dialogue (x one-pass):")
    print(f"{'sweep':>13} {'Q':>5} {'R':>3} {'one-pass s':>11} {'two-pass/one':>13} {'pipeline/one':>13}")
    for (sweep, q, r, m), rec in by.items():
        if m != "one-pass":
            continue
        two, pipe = by[(sweep, q, r, "two-pass")], by[(sweep, q, r, "pipeline")]
        print(f"{sweep:>13} {q:>5} {r:>3} {rec['median_s']:>11.4f} {two['ratio_vs_one_pass']:>12.2f}x "
              f"{pipe['ratio_vs_one_pass']:>12.2f}x")
    qs = [rec for rec in records if rec["sweep"] == "query_length" and rec["method"] == "one-pass"]
    if qs:
        top = max(qs, key=lambda x: x["query_tokens"])
        q = top["query_tokens"]
        two = by[("query_length", q, 1, "two-pass")]["ratio_vs_one_pass"]
        pipe = by[("query_length", q, 1, "pipeline")]["ratio_vs_one_pass"]
        print(f"\nAt query length {q}: two-pass takes {two:.2f}x and pipeline {pipe:.2f}x the one-pass time per dialogue.")


if __name__ == "__main__":
    sys.exit(main())
