"""Forward+backward time of ``compute_joint_loss`` on padded vs packed micro-batches (``data.packing``).

Takes micro-batches of query rows from a prepared RAG dataset (with its documents, as the trainer's
collator does), builds the tiny-cpu recipe's Llama (hidden 128, intermediate 384, 2 layers, 4 heads,
sdpa, fp32; no DeepSpeed) and times one forward+backward per micro-batch for each layout, the layouts
interleaved so that machine noise hits them alike. Prints the padding fraction and the median CPU
seconds per micro-batch of each (one thread, as each trainer rank runs). ``pack_tokens`` 0 is one
packed sequence per micro-batch (queries, and docs).

On CPU the block-diagonal mask is dense, so attention grows with the bin's length squared: measured on
the synthetic world (query rows 199-256 tokens, docs 52-81), onegen packed with pack_tokens 128 took
0.92-0.96x the padded time, 256 about 1.0x, 512 1.25x and 0 (one bin) 2.5x; grit 0.73x at 128.

    python -m data_prep world --out runs/world
    python bench/packing_step.py --data runs/world/rag_train --batches 8 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import transformers

from onegen.prepared import open_prepared
from pipeline.collator import Batch, CollatorConfig, OneGenCollator
from pipeline.config import LossConfig
from pipeline.forward import compute_joint_loss


def tiny_cpu_llama(vocab: int, attn: str) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=4, vocab_size=vocab, max_position_embeddings=512,
                                   tie_word_embeddings=True)
    cfg._attn_implementation = attn
    return transformers.LlamaForCausalLM(cfg).float()


def step_seconds(model: torch.nn.Module, batch: Batch, cfg: LossConfig) -> float:
    """CPU seconds of this process (not wall time: on a shared machine other jobs' load skews wall time)."""
    model.zero_grad(set_to_none=True)
    t0 = time.process_time()
    loss, _ = compute_joint_loss(model, batch, cfg)
    loss.backward()
    return time.process_time() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
    ap.add_argument("--data", required=True, help="a prepared RAG dataset dir (e.g. runs/world/rag_train)")
    ap.add_argument("--mode", default="onegen")
    ap.add_argument("--ret-loss", default="infonce")
    ap.add_argument("--micro-batch", type=int, default=8, help="query rows per micro-batch")
    ap.add_argument("--batches", type=int, default=8, help="micro-batches timed")
    ap.add_argument("--repeats", type=int, default=3, help="passes over the micro-batches (the first is warm-up)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a trainer rank runs OMP_NUM_THREADS=1)")
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument("--pack-tokens", type=int, nargs="*",
                    help="pack_tokens to try (default: 0, and 0.5x, 1x, 2x the longest query row)")
    ns = ap.parse_args()
    torch.set_num_threads(ns.threads)
    data = open_prepared(ns.data)
    longest = max(len(r) for r in data.queries["input_ids"])
    tried = ns.pack_tokens or [0, longest // 2, longest, 2 * longest]
    layouts = [("padded", False, 0)] + [(f"packed {p}", True, p) for p in tried]
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(data.path / "tokenizer"))
    pad_id = int(tokenizer.pad_token_id or 0)
    rows = [data.query_rows(list(range(i * ns.micro_batch, (i + 1) * ns.micro_batch))) for i in range(ns.batches)]
    batches = {}
    for name, packing, pack_tokens in layouts:
        col = OneGenCollator(data.doc_rows, pad_id, CollatorConfig(mode=ns.mode, num_negatives=1, packing=packing,
                                                                   pack_tokens=pack_tokens))
        batches[name] = [col(r) for r in rows]
    model = tiny_cpu_llama(len(tokenizer), ns.attn)
    cfg = LossConfig(mode=ns.mode, ret_loss=ns.ret_loss)
    times: dict[str, list[float]] = {name: [] for name, *_ in layouts}
    for rep in range(ns.repeats):
        for i in range(ns.batches):
            for name in times:
                t = step_seconds(model, batches[name][i], cfg)
                if rep:
                    times[name].append(t)
    print(f"{ns.mode}/{ns.ret_loss}, {ns.batches} micro-batches of {ns.micro_batch} query rows, longest query row "
          f"{longest}, {ns.attn}, {ns.threads} thread(s)")
    print(f"{'layout':>14} {'pad frac':>9} {'q shape':>10} {'doc shape':>10} {'cpu s/step':>10} {'vs padded':>9}")
    base = statistics.median(times["padded"])
    for name, bs in batches.items():
        frac = statistics.mean(b.padding_fraction() for b in bs)
        q, d = bs[0].input_ids.shape, bs[0].doc_input_ids.shape
        med = statistics.median(times[name])
        print(f"{name:>14} {frac:9.3f} {q[0]:>4}x{q[1]:<5} {d[0]:>4}x{d[1]:<5} {med:10.4f} {med / base:9.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
