"""The data_prep stage end to end: every prepared row obeys the role contract (design §1–§2).

Inputs: a tiny synthetic world (``data_prep.world.prepare_world``: RAG and EL, train and dev, one
shared tokenizer) and the real samples in ../shared/data (HotpotQA distractor, 2Wiki, ELEVANT
kore50; skipped with the reason where absent). Every prepared directory goes through the same
checker, ``check_prepared_dir``, which re-derives the invariants from the shards themselves.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from conftest import ROOT, shared_file
from data_prep.mining import MiningConfig
from data_prep.prepare import PrepConfig, prepare
from data_prep.synthetic import WorldConfig
from data_prep.tagging import TaggingConfig
from data_prep.world import WorldPrepConfig, prepare_world
from onegen.errors import ConfigError
from onegen.manifest import sha256_file
from onegen.roles import CTX, GEN, IGNORE_INDEX, RET, next_token_targets
from onegen.shards import list_shards, load_shards
from onegen.tokens import SpecialTokens

HOTPOT_DISTRACTOR = "hotpotqa/hipporag_hotpot_train_distractor100.json"
TWOWIKI_SAMPLE = "2wikimultihopqa/2wiki_dev_sample500.json.gz"
KORE50 = "entity_linking/elevant/kore50.benchmark.jsonl"

TINY_WORLD = WorldConfig(n_train_entities=60, n_dev_entities=30, n_train_questions=120, n_dev_questions=30,
                         n_train_el=60, n_dev_el=20)
WORLD_TAGGING = dict(max_length=256, max_doc_length=96)


def _env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", COLUMNS="200",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return env


def run_cli(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data_prep", *args], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


def read_table(path: Path) -> pa.Table:
    with pa.memory_map(str(path)) as src:
        return pa.ipc.open_stream(src).read_all()


def read_rows(directory: Path, sub: str) -> list[dict]:
    rows = []
    for p in list_shards(directory / sub):
        rows += read_table(p).to_pylist()
    return rows


def quiet(*_a, **_k) -> None:
    pass


# ---------------------------------------------------------------------------------------------
# the checker
# ---------------------------------------------------------------------------------------------

def check_prepared_dir(d: Path, hashes: bool = True) -> dict:
    """Assert every invariant of one prepared directory; return a few totals for the caller.

    ``hashes=False`` skips the manifest's byte-level checks (shard sha256, bytes, token counts), so
    that a tampered row must be caught by the row invariants themselves.
    """
    from transformers import AutoTokenizer

    manifest = json.loads((d / "manifest.json").read_text())
    task = manifest["task"]
    assert task in ("rag", "el")

    # -- tokenizer: loads from the dir, special tokens are single ids equal to the manifest's
    tok = AutoTokenizer.from_pretrained(str(d / "tokenizer"), local_files_only=True)
    st = SpecialTokens()
    ids = manifest["tokenizer"]["special_token_ids"]
    assert set(ids) == set(st.all_tokens())
    for name in st.all_tokens():
        assert tok.convert_tokens_to_ids(name) == ids[name], name
        assert tok(name, add_special_tokens=False)["input_ids"] == [ids[name]], f"{name} is split by the tokenizer"
    assert len(tok) == manifest["tokenizer"]["vocab_size"]
    eos = tok.eos_token_id
    assert eos is not None and eos == manifest["tokenizer"]["eos_token_id"]
    rq, rd, lk, se, con = (ids[st.rq], ids[st.rd], ids[st.lk], ids[st.se], ids[st.con])
    p_open, p_close = ids[st.para_open], ids[st.para_close]

    # -- documents
    docs = read_rows(d, "docs")
    doc_ids = [r["doc_id"] for r in docs]
    assert len(doc_ids) == len(set(doc_ids)), "duplicate doc ids in docs/"
    doc_ret = rd if task == "rag" else se
    for r in docs:
        roles = r["roles"]
        assert len(roles) == len(r["input_ids"]) >= 2
        assert r["input_ids"][-1] == doc_ret and roles[-1] == RET, r["doc_id"]
        assert roles.count(RET) == 1 and GEN not in roles, r["doc_id"]
        assert (next_token_targets(r["input_ids"], roles, is_query=False) == IGNORE_INDEX).all()
    doc_set = set(doc_ids)

    # -- queries
    queries = read_rows(d, "queries")
    assert queries, f"{d}: no query rows"
    n_ret = n_neg = 0
    sources: set[str] = set()
    for row in queries:
        eid, x, roles = row["example_id"], row["input_ids"], row["roles"]
        assert row["task"] == task
        assert len(x) == len(roles) and set(roles) <= {CTX, GEN, RET}, eid
        rets = [i for i, r in enumerate(roles) if r == RET]
        assert row["ret_positions"] == rets, eid
        pos, negs, srcs = row["positives"], row["negatives"], row["neg_source"]
        assert len(pos) == len(rets) == len(negs) == len(srcs), eid
        n_ret += len(rets)

        # the retrieval tokens are exactly the RET positions
        own, other = (rq, [lk, con, se, rd]) if task == "rag" else (lk, [rq, rd, se, p_open, p_close])
        assert [i for i, t in enumerate(x) if t == own] == rets, eid
        assert not set(other) & set(x), f"{eid}: a special token of the other task/side"

        # positives exist in docs/, negatives exist, differ from their positive and from every gold hop
        for j, (p, ng, sc) in enumerate(zip(pos, negs, srcs)):
            assert p and p in doc_set, f"{eid}: positive {p!r} not in docs/"
            assert len(ng) == len(sc) and len(ng) == len(set(ng)), eid
            assert p not in ng, f"{eid}: negative equals positive {p!r} at RET #{j}"
            if task == "rag":
                assert not set(ng) & set(pos), f"{eid}: a negative is a gold hop"
            assert set(ng) <= doc_set, eid
            assert all(s in ("bm25", "given") or s.startswith("dense:") for s in sc), sc
            n_neg += len(ng)
            sources.update(sc)

        # prompt is CTX, the answer side starts with GEN, the row ends with EOS as GEN
        pl = row["prompt_len"]
        assert 0 < pl < len(x) and set(roles[:pl]) == {CTX} and roles[pl] == GEN, eid
        assert x[-1] == eos and roles[-1] == GEN, f"{eid}: does not end with EOS/GEN"
        assert eos not in x[pl:-1], f"{eid}: EOS before the end"

        # labels derived from roles: the model learns to emit each RET token, never predicts after it
        tg = next_token_targets(x, roles, is_query=True)
        for p in rets:
            assert p + 1 < len(x) and roles[p + 1] == CTX, eid
            assert tg[p] == IGNORE_INDEX, f"{eid}: a CE target follows the RET token at {p}"
            assert tg[p - 1] == x[p], f"{eid}: the RET token at {p} is not a CE target"
        learned = np.flatnonzero(tg != IGNORE_INDEX)
        assert all(roles[t] != RET and roles[t + 1] in (GEN, RET) for t in learned), eid
        assert len(learned) == sum(r != CTX for r in roles[1:]), eid

        if task == "rag":
            opens = [i for i, t in enumerate(x) if t == p_open]
            closes = [i for i, t in enumerate(x) if t == p_close]
            assert opens == [p + 1 for p in rets], f"{eid}: <paragraph> does not follow each [RQ]"
            assert len(closes) == len(opens)
            for o, c in zip(opens, closes):
                assert o < c and set(roles[o:c + 1]) == {CTX}, f"{eid}: <paragraph> span is not all CTX"
            assert len(x) <= manifest["config"]["tagging"]["max_length"]
            assert row["answer"] and row["answers"][0] == row["answer"]
        else:
            assert [i for i, t in enumerate(x) if t == con] == [p + 1 for p in rets], f"{eid}: [CON] not after [LK]"
            linked = [m for m in row["mentions"] if m["entity_id"] != "<NIL>"]
            assert len(pos) <= len(linked)

    assert n_ret > 0 and n_neg > 0, f"{d}: no RET token or no negative at all"
    assert "bm25" in sources

    # -- manifest: counts, tokens, bytes, shard hashes, fingerprint
    if not hashes:
        return {"queries": len(queries), "docs": len(docs), "ret": n_ret, "negatives": n_neg}
    c = manifest["counts"]
    quarantine = [json.loads(l) for l in (d / "quarantine.jsonl").read_text().splitlines() if l.strip()]
    assert c["queries"] == len(queries) and c["docs"] == len(docs) and c["ret_tokens"] == n_ret
    assert c["quarantined"] == len(quarantine)
    assert manifest["tokens"] == {"queries": sum(len(r["input_ids"]) for r in queries),
                                  "docs": sum(len(r["input_ids"]) for r in docs)}
    files = [p for sub in ("docs", "queries") for p in list_shards(d / sub)]
    assert manifest["bytes"] == sum(p.stat().st_size for p in files)
    for sub in ("docs", "queries"):
        entries = manifest["shards"][sub]
        assert [e["name"] for e in entries] == [p.name for p in list_shards(d / sub)]
        for e in entries:
            assert e["sha256"] == sha256_file(d / sub / e["name"])
    assert re.fullmatch(r"[0-9a-f]{64}", manifest["fingerprint"])
    assert manifest["stage"] == "data_prep" and manifest["mining"]["num_docs"] == len(docs)
    assert not list(d.rglob(".*.tmp")), "temporary files left behind"
    return {"queries": len(queries), "docs": len(docs), "ret": n_ret, "negatives": n_neg}


# ---------------------------------------------------------------------------------------------
# fixtures: the prepared directories (built once per module, in-process: imports cost once)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    cfg = WorldPrepConfig(out=str(out), shard_size=50, world=TINY_WORLD, tagging=TaggingConfig(**WORLD_TAGGING))
    manifests = prepare_world(cfg, log=quiet)
    assert set(manifests) == {"rag_train", "rag_dev", "el_train", "el_dev"}
    return out


def _prepare_shared(tmp_path_factory, name: str, rel: str, kind: str, **kw) -> Path:
    path = shared_file(rel)
    out = tmp_path_factory.mktemp(name)
    prepare(PrepConfig(kind=kind, input=str(path), out=str(out), **kw), log=quiet)
    return out


@pytest.fixture(scope="module")
def hotpot(tmp_path_factory) -> Path:
    return _prepare_shared(tmp_path_factory, "hotpot", HOTPOT_DISTRACTOR, "hotpotqa", shard_size=40)


@pytest.fixture(scope="module")
def twowiki(tmp_path_factory) -> Path:
    return _prepare_shared(tmp_path_factory, "twowiki", TWOWIKI_SAMPLE, "2wiki", max_examples=50)


@pytest.fixture(scope="module")
def kore50(tmp_path_factory) -> Path:
    return _prepare_shared(tmp_path_factory, "kore50", KORE50, "elevant")


PREPARED = {
    "world/rag_train": ("world", "rag_train"), "world/rag_dev": ("world", "rag_dev"),
    "world/el_train": ("world", "el_train"), "world/el_dev": ("world", "el_dev"),
    "hotpotqa": ("hotpot", None), "2wiki": ("twowiki", None), "kore50": ("kore50", None),
}


@pytest.fixture(params=sorted(PREPARED))
def prepared(request) -> Path:
    fixture, sub = PREPARED[request.param]
    if fixture != "world":
        request.applymarker(pytest.mark.shared_data)
    base = request.getfixturevalue(fixture)
    return base / sub if sub else base


# ---------------------------------------------------------------------------------------------
# role invariants, schema, memory mapping, manifest
# ---------------------------------------------------------------------------------------------

def test_role_invariants_on_every_row(prepared):
    totals = check_prepared_dir(prepared)
    assert totals["queries"] > 0 and totals["docs"] > 0


def test_world_splits_share_one_tokenizer(world):
    fps = {json.loads((world / s / "manifest.json").read_text())["tokenizer"]["fingerprint"]
           for s in ("rag_train", "rag_dev", "el_train", "el_dev")}
    assert len(fps) == 1
    # shard_size=50 over 120 train questions: several query shards, the last one partial
    sizes = [read_table(p).num_rows for p in list_shards(world / "rag_train" / "queries")]
    assert sizes == [50, 50, 20]


def test_shard_schema_is_typed(world):
    q = list_shards(world / "rag_train" / "queries")[0]
    d = list_shards(world / "el_train" / "docs")[0]
    with pa.memory_map(str(q)) as src:
        qs = pa.ipc.open_stream(src).schema
    with pa.memory_map(str(d)) as src:
        ds = pa.ipc.open_stream(src).schema
    assert qs.field("input_ids").type == pa.list_(pa.int32())
    assert qs.field("roles").type == pa.list_(pa.int8())
    assert qs.field("ret_positions").type == pa.list_(pa.int32())
    assert qs.field("negatives").type == pa.list_(pa.list_(pa.string()))
    assert qs.field("prompt_len").type == pa.int32()
    assert ds.field("input_ids").type == pa.list_(pa.int32()) and ds.field("roles").type == pa.list_(pa.int8())
    assert ds.field("doc_id").type == pa.string()


def test_shards_load_memory_mapped_with_dtypes(world):
    import datasets
    from datasets.table import MemoryMappedTable

    paths = list_shards(world / "rag_train" / "queries")
    one = datasets.Dataset.from_file(str(paths[0]))
    assert [f["filename"] for f in one.cache_files] == [str(paths[0])]
    assert isinstance(one.data, MemoryMappedTable), type(one.data)
    both = load_shards(paths)
    assert sorted(f["filename"] for f in both.cache_files) == sorted(map(str, paths))
    assert len(both) == sum(read_table(p).num_rows for p in paths)
    # the dtypes survive the round trip into datasets' features and its Arrow view
    # (datasets' numpy/torch formatters upcast list columns to int64: a reader's choice, not the shard's)
    assert both.features["input_ids"].feature.dtype == "int32"
    assert both.features["roles"].feature.dtype == "int8"
    assert both.features["ret_positions"].feature.dtype == "int32"
    last = both.with_format("arrow")[len(both) - 1:len(both)]
    assert last.schema.field("roles").type == pa.list_(pa.int8())
    roles = np.asarray(last["roles"][0].values)
    assert roles.dtype == np.int8
    assert (np.flatnonzero(roles == RET) == np.asarray(last["ret_positions"][0].values)).all()


# ---------------------------------------------------------------------------------------------
# determinism: worker count, rerun, resume, config / input guard
# ---------------------------------------------------------------------------------------------

def _world_cfg(world: Path, kind: str, out: Path, **kw) -> PrepConfig:
    inputs = {"rag": ("hotpotqa", "train.json", None), "el": ("elevant", "el_train.jsonl", "kb.jsonl")}
    k, name, kb = inputs[kind]
    base = dict(kind=k, input=str(world / "raw" / name), kb=str(world / "raw" / kb) if kb else None, out=str(out),
                tokenizer=str(world / "tokenizer"), shard_size=25, doc_shard_size=40,
                tagging=TaggingConfig(**WORLD_TAGGING), mining=MiningConfig())
    base.update(kw)
    return PrepConfig(**base)


@pytest.mark.parametrize("kind", ["rag", "el"])
def test_num_proc_2_gives_the_same_fingerprint(world, tmp_path, kind):
    m1 = prepare(_world_cfg(world, kind, tmp_path / "p1", num_proc=1), log=quiet)
    m2 = prepare(_world_cfg(world, kind, tmp_path / "p2", num_proc=2), log=quiet)
    assert len(m1["shards"]["queries"]) >= 3 and len(m1["shards"]["docs"]) >= 2  # several shards to share out
    assert m1["fingerprint"] == m2["fingerprint"]
    assert m1["shards"] == m2["shards"]
    check_prepared_dir(tmp_path / "p2")


def test_fingerprint_does_not_depend_on_paths(world, tmp_path):
    """Same bytes, same fingerprint: the input and tokenizer directories may live anywhere."""
    import shutil

    shutil.copytree(world / "tokenizer", tmp_path / "elsewhere" / "tok")
    shutil.copy(world / "raw" / "dev.json", tmp_path / "elsewhere" / "dev.json")
    a = prepare(_world_cfg(world, "rag", tmp_path / "a", input=str(world / "raw" / "dev.json")), log=quiet)
    b = prepare(_world_cfg(world, "rag", tmp_path / "b", input=str(tmp_path / "elsewhere" / "dev.json"),
                           tokenizer=str(tmp_path / "elsewhere" / "tok")), log=quiet)
    assert a["fingerprint"] == b["fingerprint"]
    # ... but another tokenizer is another dataset
    c = prepare(_world_cfg(world, "rag", tmp_path / "c", input=str(world / "raw" / "dev.json"), tokenizer="bpe:300"),
                log=quiet)
    assert c["fingerprint"] != a["fingerprint"]


def _stats(d: Path) -> dict:
    return {str(p.relative_to(d)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in d.rglob("*") if p.is_file()}


def test_rerun_is_a_noop_and_resume_rewrites_only_missing_shards(world, tmp_path):
    out = tmp_path / "p"
    first = prepare(_world_cfg(world, "rag", out), log=quiet)
    before = _stats(out)
    logs: list[str] = []
    again = prepare(_world_cfg(world, "rag", out, num_proc=2), log=logs.append)  # num_proc changes no byte
    assert again["fingerprint"] == first["fingerprint"]
    assert _stats(out) == before, "a rerun of a finished prepare touched files"
    assert any("nothing to do" in l for l in logs), logs

    # a directory missing one shard and its manifest (what a kill leaves): only that shard is rebuilt
    (out / "manifest.json").unlink()
    (out / "queries" / "shard-00001.arrow").unlink()
    logs.clear()
    resumed = prepare(_world_cfg(world, "rag", out), log=logs.append)
    assert resumed["fingerprint"] == first["fingerprint"]
    assert any("resuming" in l for l in logs), logs
    after = _stats(out)
    for name in ("queries/shard-00000.arrow", "queries/shard-00002.arrow", "docs/shard-00000.arrow"):
        assert after[name] == before[name], f"{name} was rewritten"


def test_other_config_in_the_same_dir_is_a_config_error(world, tmp_path, capsys):
    out = tmp_path / "p"
    prepare(_world_cfg(world, "rag", out), log=quiet)
    with pytest.raises(ConfigError, match=r"another config \(differs in: tagging\)"):
        prepare(_world_cfg(world, "rag", out, tagging=TaggingConfig(max_length=200, max_doc_length=96)), log=quiet)
    with pytest.raises(ConfigError, match=r"differs in: mining"):
        prepare(_world_cfg(world, "rag", out, mining=MiningConfig(seed=1)), log=quiet)
    # through the CLI: a one-line error and exit code 2, no traceback
    from data_prep.__main__ import main

    capsys.readouterr()  # drop the progress bars of the first run
    rc = main(["prepare", "--kind", "hotpotqa", "--input", str(world / "raw" / "train.json"), "--out", str(out),
               "--tokenizer", str(world / "tokenizer"), "shard_size=25", "doc_shard_size=40",
               "tagging.max_length=256", "tagging.max_doc_length=64"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "another config" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_edited_input_in_the_same_dir_is_a_config_error(world, tmp_path):
    raw = json.loads((world / "raw" / "train.json").read_text())
    inp = tmp_path / "train.json"
    inp.write_text(json.dumps(raw[:60]))
    out = tmp_path / "p"
    prepare(_world_cfg(world, "rag", out, input=str(inp)), log=quiet)
    inp.write_text(json.dumps(raw[:59]))
    with pytest.raises(ConfigError, match="other input files"):
        prepare(_world_cfg(world, "rag", out, input=str(inp)), log=quiet)


# ---------------------------------------------------------------------------------------------
# the CLI: inspect and help
# ---------------------------------------------------------------------------------------------

def test_inspect_cli_prints_roles_and_negatives(world):
    d = world / "rag_train"
    r = run_cli("inspect", str(d), "-n", "2")
    assert r.returncode == 0, r.stderr
    row = read_table(list_shards(d / "queries")[0]).slice(0, 1).to_pylist()[0]
    out = r.stdout
    assert "CTX" in out and "GEN" in out and "RET" in out and "[RQ]" in out
    assert f"query 0: {row['example_id']}" in out
    assert f"RET #0 at token {row['ret_positions'][0]}: + {row['positives'][0]}" in out
    for neg, src in zip(row["negatives"][0], row["neg_source"][0]):
        assert re.search(rf"- {re.escape(neg)} \(.*\)\s+{re.escape(src)}", out), (neg, src)


def test_inspect_el_in_process(world):
    from rich.console import Console

    from data_prep.inspect_cmd import inspect

    buf = io.StringIO()
    inspect(world / "el_train", n=1, console=Console(file=buf, width=200, color_system=None))
    out = buf.getvalue()
    row = read_table(list_shards(world / "el_train" / "queries")[0]).slice(0, 1).to_pylist()[0]
    assert "[LK]" in out and "[CON]" in out and "[SE]" in out
    assert f"RET #0 at token {row['ret_positions'][0]}: + {row['positives'][0]}" in out


def test_cli_help_and_help_config():
    r = run_cli("--help")
    assert r.returncode == 0 and all(w in r.stdout for w in ("prepare", "inspect", "world", "synthetic"))
    r = run_cli("prepare", "--help-config")
    assert r.returncode == 0, r.stderr
    keys = {line.split(" = ")[0].strip() for line in r.stdout.splitlines() if " = " in line}
    for k in ("kind", "shard_size", "num_proc", "tagging.max_length", "tokens.rq", "mining.rank_window", "mining.seed"):
        assert k in keys, f"--help-config does not list {k}"


def test_world_cli_overrides_reach_nested_sections(tmp_path):
    """`world.*` / `mining.*` key=value overrides are documented in the CLI help: they must apply."""
    from onegen.config import load_config

    from data_prep.world import WorldPrepConfig as W

    cfg = load_config(W, None, ["out=x", "world.n_train_questions=7", "mining.rank_window=[2,9]"])
    assert cfg.world.n_train_questions == 7 and cfg.mining.rank_window == [2, 9]
    pc = load_config(PrepConfig, None, ["mining.dense=true", "mining.num_bm25=2"])
    assert pc.mining.dense is True and pc.mining.num_bm25 == 2


# ---------------------------------------------------------------------------------------------
# over-long examples: shortened from their paragraphs, or quarantined as "too long"
# ---------------------------------------------------------------------------------------------

def _paragraph_body_lengths(x: list[int], p_open: int, p_close: int) -> list[int]:
    opens = [i for i, t in enumerate(x) if t == p_open]
    closes = [i for i, t in enumerate(x) if t == p_close]
    return [c - o - 1 for o, c in zip(opens, closes)]


def test_over_long_examples_are_shortened_or_quarantined(world, tmp_path):
    st = SpecialTokens()
    full_m = prepare(_world_cfg(world, "rag", tmp_path / "full", tagging=TaggingConfig(max_length=4096, max_doc_length=96)),
                     log=quiet)
    ids = full_m["tokenizer"]["special_token_ids"]
    p_open, p_close = ids[st.para_open], ids[st.para_close]
    full = {r["example_id"]: r for r in read_rows(tmp_path / "full", "queries")}
    assert full_m["counts"]["quarantined"] == 0
    # the least a row can shrink to: everything but its paragraph bodies, plus one token per body
    need = {}
    for eid, r in full.items():
        bodies = _paragraph_body_lengths(r["input_ids"], p_open, p_close)
        need[eid] = len(r["input_ids"]) - sum(bodies) + len(bodies)
    # a max_length with at least one example impossible, one shortened, one untouched if possible
    limit = next((L for L in sorted(set(need.values()))
                  if any(n > L for n in need.values()) and any(n <= L < len(full[e]["input_ids"]) for e, n in need.items())),
                 None)
    assert limit is not None, "no max_length separates the world's examples"
    too_long = {e for e, n in need.items() if n > limit}
    shortened = {e for e, n in need.items() if n <= limit < len(full[e]["input_ids"])}
    assert too_long and shortened

    logs: list[str] = []
    m = prepare(_world_cfg(world, "rag", tmp_path / "short",
                           tagging=TaggingConfig(max_length=limit, max_doc_length=96)), log=logs.append)
    rows = {r["example_id"]: r for r in read_rows(tmp_path / "short", "queries")}
    quarantine = [json.loads(l) for l in (tmp_path / "short" / "quarantine.jsonl").read_text().splitlines()]

    # not silently dropped: every missing example is in quarantine.jsonl with reason "too long", counts match
    assert set(rows) | {q["record_id"] for q in quarantine} == set(full)
    assert {q["record_id"] for q in quarantine} == too_long
    assert all(q["reason"].startswith("too long") and q["line"] for q in quarantine)
    assert m["counts"]["quarantined"] == len(too_long) and m["counts"]["queries"] == len(full) - len(too_long)
    assert any(f"{len(too_long)} record(s) quarantined" in l for l in logs), logs

    for eid, r in rows.items():
        ref = full[eid]
        x, roles = r["input_ids"], r["roles"]
        assert len(x) <= limit
        if eid not in shortened:
            assert x == ref["input_ids"] and roles == ref["roles"]
            continue
        assert len(x) == limit, "shortening cut more than needed"
        # RET tokens, leads and the answer (every GEN/RET token, in order) are intact; the prompt too
        keep = [(t, q) for t, q in zip(x, roles) if q != CTX]
        assert keep == [(t, q) for t, q in zip(ref["input_ids"], ref["roles"]) if q != CTX], eid
        assert x[:r["prompt_len"]] == ref["input_ids"][:ref["prompt_len"]]
        assert len(r["ret_positions"]) == len(ref["ret_positions"]) and r["positives"] == ref["positives"]
        # only paragraph bodies were cut, each to a non-empty prefix of the original
        b_new = _paragraph_body_lengths(x, p_open, p_close)
        b_old = _paragraph_body_lengths(ref["input_ids"], p_open, p_close)
        assert all(1 <= n <= o for n, o in zip(b_new, b_old)) and sum(b_new) < sum(b_old)
    check_prepared_dir(tmp_path / "short")


# ---------------------------------------------------------------------------------------------
# the checker is not vacuous: a tampered shard fails it
# ---------------------------------------------------------------------------------------------

def _tamper_negative_is_positive(row):
    row["negatives"][0] = [row["positives"][0]] + row["negatives"][0][1:]


def _tamper_ret_role(row):
    row["roles"][row["ret_positions"][0]] = GEN


def _tamper_no_eos(row):
    row["input_ids"], row["roles"] = row["input_ids"][:-1], row["roles"][:-1]


def _tamper_paragraph_gen(row):
    row["roles"][row["ret_positions"][0] + 2] = GEN


def _tamper_unknown_positive(row):
    row["positives"][0] = "no such doc"


@pytest.mark.parametrize("tamper", [_tamper_negative_is_positive, _tamper_ret_role, _tamper_no_eos,
                                    _tamper_paragraph_gen, _tamper_unknown_positive], ids=lambda f: f.__name__[8:])
def test_checker_catches_a_tampered_row(world, tmp_path, tamper):
    import shutil

    from data_prep.schema import QUERIES_SCHEMA
    from onegen.shards import write_shard

    d = tmp_path / "copy"
    shutil.copytree(world / "rag_dev", d)
    shard = list_shards(d / "queries")[0]
    rows = read_table(shard).to_pylist()
    tamper(rows[0])
    write_shard(shard, rows, QUERIES_SCHEMA)
    check_prepared_dir(world / "rag_dev", hashes=False)
    with pytest.raises(AssertionError):
        check_prepared_dir(d, hashes=False)
