"""Throughput of the data_prep stage: examples/s with 1 and 2 worker processes, BM25 mining on.

    python bench/prep_throughput.py                      # 20,000 synthetic train questions
    python bench/prep_throughput.py --questions 50000 --num-proc 1 2 4

Generates the synthetic world (``data_prep.synthetic``), trains one BPE tokenizer on it first (so
tokenizer training is outside the timings: both runs get ``tokenizer=DIR``), then prepares the
HotpotQA-layout ``train.json`` into fresh directories, once per worker count, in this process
(imports are paid before the first timing). Prints examples/s for each, the speed-up over one
process, and asserts that every run has the same manifest fingerprint (shards are a pure function
of input and config, whatever the worker count).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

from data_prep.prepare import PrepConfig, corpus_texts, prepare
from data_prep.readers import read_hotpotqa
from data_prep.synthetic import WorldConfig, generate_world
from data_prep.tokenizer import load_tokenizer
from onegen.tokens import SpecialTokens, add_special_tokens

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _cpu_seconds() -> float:
    """User + system CPU of this process and its reaped children (the pool's workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
    ap.add_argument("--questions", type=int, default=20000, help="synthetic train questions (>= 1)")
    ap.add_argument("--entities", type=int, default=600, help="entities (= documents) of the train world")
    ap.add_argument("--num-proc", type=int, nargs="+", default=[1, 2], help="worker counts to time, in order")
    ap.add_argument("--shard-size", type=int, default=1000, help="query rows per shard")
    ap.add_argument("--vocab", type=int, default=2000, help="BPE vocabulary size")
    ap.add_argument("--workdir", help="where to write (default: a temporary directory, removed at the end)")
    args = ap.parse_args(argv)

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="onegen-prep-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t = time.perf_counter()
        raw = work / "raw"
        generate_world(WorldConfig(n_train_entities=args.entities, n_train_questions=args.questions,
                                   n_dev_questions=10, n_train_el=10, n_dev_el=10), raw, progress=False)
        t_gen = time.perf_counter() - t

        t = time.perf_counter()
        tok_dir = work / "tokenizer"
        tokenizer = load_tokenizer(f"bpe:{args.vocab}", texts=corpus_texts(read_hotpotqa(raw / "train.json")))
        add_special_tokens(tokenizer, SpecialTokens())
        tokenizer.save_pretrained(str(tok_dir))
        t_tok = time.perf_counter() - t
        print(f"world: {args.questions} questions, {args.entities} documents ({t_gen:.1f} s); "
              f"tokenizer bpe:{args.vocab} trained once ({t_tok:.1f} s), excluded from the timings; "
              f"{os.cpu_count()} CPUs visible, load average {os.getloadavg()[0]:.2f}", flush=True)

        results = []
        for n in args.num_proc:
            out = work / f"prep_np{n}"
            shutil.rmtree(out, ignore_errors=True)
            cfg = PrepConfig(kind="hotpotqa", input=str(raw / "train.json"), out=str(out), tokenizer=str(tok_dir),
                             num_proc=n, shard_size=args.shard_size)
            assert cfg.mining.bm25, "the benchmark measures preparation with BM25 mining"
            c0 = _cpu_seconds()
            t = time.perf_counter()
            manifest = prepare(cfg, log=lambda *a: None)
            wall = time.perf_counter() - t
            cpu = _cpu_seconds() - c0
            rows = manifest["counts"]["queries"]
            results.append((n, wall, rows, manifest))
            print(f"num_proc={n}: {rows} examples in {wall:.2f} s = {rows / wall:,.0f} examples/s; "
                  f"CPU {cpu:.1f} s (self + workers) = {rows / cpu:,.0f} examples per CPU-second "
                  f"({manifest['counts']['ret_tokens']} RET, {manifest['tokens']['queries']:,} tokens, "
                  f"{len(manifest['shards']['queries'])} query shards, fingerprint {manifest['fingerprint'][:12]})",
                  flush=True)

        base = results[0]
        for n, wall, rows, _ in results[1:]:
            print(f"speed-up num_proc={n} over num_proc={base[0]}: {base[1] / wall:.2f}x "
                  f"(load average now {os.getloadavg()[0]:.2f}: other processes on these CPUs cap it)")
        fps = {m["fingerprint"] for *_, m in results}
        assert len(fps) == 1, f"worker counts gave different fingerprints: {fps}"
        assert all(r[2] == args.questions - r[3]["counts"]["quarantined"] for r in results)
        print(f"same manifest fingerprint for num_proc {args.num_proc}: {fps.pop()}")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
