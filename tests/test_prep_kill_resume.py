"""A prepare killed with SIGKILL mid-run leaves only complete shards and no manifest; the rerun
finishes with the fingerprint of an uninterrupted run (design §2: atomic shards, resumable stage).

The run under test is ``python -m data_prep prepare`` in its own process group (the pool's forked
workers die with it, as under a scheduler's kill). The kill point is drawn per seed: after k
shard files exist (k random, both doc and query shards count), plus a random delay.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest

from conftest import ROOT
from data_prep.synthetic import WorldConfig, generate_world
from data_prep.tokenizer import load_tokenizer
from onegen.tokens import SpecialTokens, add_special_tokens

N_QUESTIONS = 1600
SHARD_SIZE = 100  # 16 query shards
DOC_SHARD_SIZE = 100  # 6 doc shards over 600 entities
SETTINGS = ["shard_size=100", "doc_shard_size=100", "tagging.max_length=256", "tagging.max_doc_length=96"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The raw world, one tokenizer dir, and the reference (uninterrupted, in-process) manifest."""
    base = tmp_path_factory.mktemp("killres")
    raw = base / "raw"
    generate_world(WorldConfig(n_train_questions=N_QUESTIONS, n_dev_questions=10, n_train_el=10, n_dev_el=10), raw,
                   progress=False)
    texts = sorted(f"{q['question']} {q['answer']}" for q in json.loads((raw / "train.json").read_text()))
    tok = load_tokenizer("bpe:1000", texts=texts)
    add_special_tokens(tok, SpecialTokens())
    tok.save_pretrained(str(base / "tokenizer"))
    argv = ["prepare", "--kind", "hotpotqa", "--input", str(raw / "train.json"), "--tokenizer", str(base / "tokenizer")]
    from data_prep.__main__ import main

    assert main([*argv, "--out", str(base / "reference"), *SETTINGS]) == 0
    reference = json.loads((base / "reference" / "manifest.json").read_text())
    assert reference["counts"]["queries"] == N_QUESTIONS
    assert len(reference["shards"]["queries"]) == -(-N_QUESTIONS // SHARD_SIZE)
    return {"base": base, "argv": argv, "reference": reference, "n_docs": reference["counts"]["docs"]}


def _env() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _shards(out: Path) -> list[Path]:
    return sorted(out.glob("docs/shard-*.arrow")) + sorted(out.glob("queries/shard-*.arrow"))


def _check_complete_shards(out: Path, n_docs: int) -> int:
    """Every file named shard-*.arrow opens and has exactly the rows its slice should have."""
    for p in _shards(out):
        i = int(p.stem.split("-")[1])
        with pa.memory_map(str(p)) as src:
            table = pa.ipc.open_stream(src).read_all()  # a truncated stream raises here
        if p.parent.name == "docs":
            want = min(DOC_SHARD_SIZE, n_docs - i * DOC_SHARD_SIZE)
        else:
            side = p.with_name(f"shard-{i:05d}.quarantine.jsonl")
            assert side.is_file(), f"{p.name} exists without its quarantine sidecar"
            dropped = sum(1 for l in side.read_text().splitlines() if l.strip())
            want = min(SHARD_SIZE, N_QUESTIONS - i * SHARD_SIZE) - dropped
        assert table.num_rows == want, f"{p}: {table.num_rows} rows, expected {want}"
    return len(_shards(out))


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigkill_then_rerun_gives_the_uninterrupted_fingerprint(setup, tmp_path, seed, capsys):
    rng = random.Random(seed)
    num_proc = 1 + seed % 2  # seed 0: one process; seed 1: a pool of two forked workers
    out = tmp_path / "out"
    total = len(setup["reference"]["shards"]["queries"]) + len(setup["reference"]["shards"]["docs"])
    kill_after = rng.randint(1, total - 5)  # shard files present before the kill
    delay = rng.uniform(0.0, 0.3)
    cmd = [sys.executable, "-m", "data_prep", *setup["argv"], "--out", str(out), "--num-proc", str(num_proc), *SETTINGS]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while len(_shards(out)) < kill_after:
            assert proc.poll() is None, f"prepare ended before the kill point: {proc.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, "no shard appeared in time"
            time.sleep(0.01)
        time.sleep(delay)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "manifest.json").exists(), "a killed run left a manifest (kill came too late: raise total-5)"

    present = _check_complete_shards(out, setup["n_docs"])
    print(f"seed {seed}: num_proc {num_proc}, killed after {kill_after}+{delay:.2f}s, {present}/{total} shards, "
          f"{len(list(out.rglob('.shard-*.tmp')))} temporaries")
    assert kill_after <= present < total

    # what a kill inside a write leaves: a half-written temporary (it must be removed, never read as a shard)
    first = _shards(out)[0]
    (first.parent / f".{first.name}.killed.tmp").write_bytes(first.read_bytes()[: first.stat().st_size // 2])

    # rerun the same command to completion (in-process through the CLI entry point: same code path)
    from data_prep.__main__ import main

    capsys.readouterr()
    assert main([*setup["argv"], "--out", str(out), "--num-proc", str(num_proc), *SETTINGS]) == 0
    log = capsys.readouterr().out
    assert "half-written temporary" in log and f"resuming: " in log, log
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["fingerprint"] == setup["reference"]["fingerprint"]
    assert manifest["shards"] == setup["reference"]["shards"]
    assert manifest["counts"] == setup["reference"]["counts"]
    assert _check_complete_shards(out, setup["n_docs"]) == total
    assert not list(out.rglob(".shard-*.tmp")), "half-written temporaries were not cleaned up"
