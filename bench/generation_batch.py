"""Batched decoding: questions (RAG) or texts (EL) per second at batch sizes B vs batch 1, same outputs.

    python bench/generation_batch.py --model runs/quickstart/train-onegen/model \
        --data runs/quickstart/world/rag_dev --n 48 --batch-sizes 1 4 16

One process, one checkpoint, one index (built once, not timed): the first ``--n`` rows of the
prepared dataset are answered by one-pass OneGen (RAG: free generation, distractor setting; EL: free
marking and linking) at each batch size in turn, after one untimed warm-up group. Every batch size
must give the batch-1 outputs token for token (the bench fails otherwise); it prints rows/s per
batch size, and last the speed-up of each over batch 1 measured in this run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from evaluation.index import build_index, open_index
from onegen.prepared import open_prepared


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
    ap.add_argument("--model", required=True, help="exported OneGen checkpoint dir")
    ap.add_argument("--data", required=True, help="prepared RAG or EL dataset dir (its docs are indexed)")
    ap.add_argument("--n", type=int, default=48, help="rows answered at each batch size")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16], help="batch 1 is always run first")
    ap.add_argument("--max-new-tokens", type=int, help="RAG default 64; EL default 2 x text tokens + 16")
    ap.add_argument("--device", help="cpu / cuda (default: cuda when available)")
    ns = ap.parse_args(argv)
    if ns.n < 1 or min(ns.batch_sizes) < 1:
        ap.error("--n and every --batch-sizes value must be >= 1")

    # heavy (torch, transformers): imported after the arguments are parsed, so --help starts fast
    from evaluation.generate import GenerationConfig, run_questions
    from evaluation.linking import LinkConfig, run_linking  # lazy: as above
    from evaluation.retrievers import build_retriever  # lazy: as above
    from evaluation.runtime import load_runtime  # lazy: as above

    data = open_prepared(ns.data)
    rt = load_runtime(ns.model, data, device=ns.device)
    n = min(ns.n, len(data))
    with tempfile.TemporaryDirectory() as tmp:
        build_index(ns.model, ns.data, Path(tmp) / "index", runtime=rt, progress=False)
        index = open_index(Path(tmp) / "index", ns.model)
        retriever = build_retriever("onegen", rt, index)

        def run(b: int, rows: range) -> list:
            if data.task == "el":
                return run_linking(rt, index, LinkConfig(max_new_tokens=ns.max_new_tokens, batch_size=b), rows,
                                   progress=False)
            return run_questions(rt, retriever, GenerationConfig(max_new_tokens=ns.max_new_tokens or 64, batch_size=b), rows,
                                 progress=False)

        sizes = [1] + [b for b in dict.fromkeys(ns.batch_sizes) if b != 1]
        print(f"{n} {data.task} rows of {ns.data}, {ns.model} on {rt.device}", flush=True)
        reference, rates = None, {}
        for b in sizes:
            run(b, range(min(b, n)))  # warm-up group
            t0 = time.perf_counter()
            results = run(b, range(n))
            wall = time.perf_counter() - t0
            answers = [r.output_ids for r in results]
            if reference is None:
                reference = answers
            same = sum(a == r for a, r in zip(answers, reference))
            rates[b] = n / wall
            print(f"batch {b:3d}: {wall:7.2f} s  {rates[b]:6.2f} rows/s  "
                  f"{sum(r.n_generated for r in results) / wall:7.1f} generated tokens/s  "
                  f"answers equal to batch 1: {same}/{n}", flush=True)
            if same != n:
                print(f"error: batch {b} changed {n - same} of {n} answers", file=sys.stderr)
                return 1
    print("speed-up over batch 1: " + ", ".join(f"batch {b} {rates[b] / rates[1]:.2f}x" for b in sizes[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
