"""The data_prep stage: records → token rows with roles → mined negatives → Arrow shards + manifest.

Output layout (design §2)::

    OUT/manifest.json        written last: its presence means the directory is complete
    OUT/prep_config.json     the resolved config, written first: a rerun must match it
    OUT/tokenizer/           the tokenizer with the OneGen special tokens
    OUT/docs/shard-*.arrow   doc_id, title, text, input_ids (int32), roles (int8)
    OUT/queries/shard-*.arrow + shard-*.quarantine.jsonl (rows that could not be built, with reasons)
    OUT/*/shard-*.cut.json   rows / documents of the shard shortened to fit (data_prep.truncation)
    OUT/truncated.jsonl      every cut document / row: id, tokens before and after, reason
    OUT/doc_lengths.json     the pool's document row lengths and the max_doc_length they decide (data_prep.doclength)
    OUT/split_ids.json       the sorted ids of the examples used, and the holdout rule (data_prep.holdout)
    OUT/quarantine.jsonl     every record that was skipped, one reason per line (--on-error skip)

Each shard is a pure function of (inputs, config, shard index); shards are written atomically and a
rerun skips the finished ones, so a killed run resumes and ends with the same bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa

from data_prep import doclength, holdout
from data_prep.holdout import HoldoutConfig
from data_prep.inputs import corpus_texts, input_fingerprints, read_inputs  # noqa: F401 (corpus_texts: world, bench)
from data_prep.mining import MiningConfig, MiningQuery, NegativeMiner, unstemmed_warning
from data_prep.readers.errors import ErrorPolicy
from data_prep.readers.leads import LEAD_FROM_HELP, LeadFrom
from data_prep.records import NIL_ID, Dataset, Document
from data_prep.schema import DOCS_SCHEMA, QUERIES_SCHEMA
from data_prep.tagging import Tagger, TaggingConfig, TooLong
from data_prep.tokenizer import describe_source, load_tokenizer
from data_prep.truncation import REPORT, count_cuts, describe_cuts, write_cut_count, write_report
from data_prep.workers import run_shards
from onegen.config import from_dict
from onegen.errors import ConfigError, InputError
from onegen.manifest import MANIFEST_NAME, atomic_write_bytes, atomic_write_json, fingerprint_files, sha256_file, sha256_json, write_manifest
from onegen.roles import check_row_invariants, ret_positions
from onegen.shards import list_shards, remove_stale_temporaries, shard_path, write_shard
from onegen.tokens import SpecialTokens, add_special_tokens, tokenizer_fingerprint


def _mining_config_cls():
    return MiningConfig


@dataclass
class PrepConfig:
    kind: Literal["hotpotqa", "2wiki", "elevant", "onegen"] = field(
        default="hotpotqa", metadata={"help": "input format"})
    input: str = field(default="", metadata={"help": "benchmark file (.json/.jsonl, .gz ok); train.jsonl for kind=onegen"})
    out: str = field(default="", metadata={"help": "output directory (the prepared dataset)"})
    kb: str | None = field(default=None, metadata={"help": "entity KB JSONL {id,name,description} (elevant); default: names from the labels"})
    db: str | None = field(default=None, metadata={"help": "db.jsonl of the OneGen reference format (kind=onegen)"})
    aliases: str | None = field(default=None, metadata={"help": "2Wiki answer aliases file (id_aliases.json)"})
    corpus: str | None = field(default=None, metadata={"help": "extra passages {title,text} for the open setting (added to the doc pool)"})
    tokenizer: str = field(default="bpe:2000", metadata={"help": "bpe:N (train on this data), smollm2, a local dir, or a hub name with allow_network"})
    allow_network: bool = field(default=False, metadata={"help": "allow loading a tokenizer/benchmark from the Hugging Face hub"})
    from_hub: str | None = field(default=None, metadata={"help": "load the benchmark from the hub instead of --input (needs allow_network)"})
    split: str = field(default="validation", metadata={"help": "hub split, with from_hub"})
    require_gold_in_context: bool = field(default=True, metadata={"help": "HotpotQA/2Wiki: a supporting fact must point at a context paragraph"})
    on_error: Literal["fail", "skip"] = field(default="fail", metadata={"help": "fail on the first bad record, or skip it into quarantine.jsonl"})
    max_examples: int | None = field(default=None, metadata={"help": "use only the first N examples (of the holdout part)"})
    lead_from: LeadFrom = field(default="auto", metadata={"help": LEAD_FROM_HELP})
    el_max_chars: int = field(default=400, metadata={"help": "EL documents longer than this are split into passages at sentence ends"})
    shard_size: int = field(default=1000, metadata={"help": "query rows per shard"})
    doc_shard_size: int = field(default=20000, metadata={"help": "document rows per shard"})
    num_proc: int = field(default=1, metadata={"help": "worker processes (shards are identical for any value)"})
    tagging: TaggingConfig = field(default_factory=TaggingConfig)
    tokens: SpecialTokens = field(default_factory=SpecialTokens)
    # Typed as the dataclass (not Any) so `mining.*=...` overrides and --help-config reach its fields.
    mining: MiningConfig = field(default_factory=MiningConfig, metadata={"help": "hard-negative mining"})
    holdout: HoldoutConfig = field(default_factory=HoldoutConfig, metadata={"help": "train / held-out split by question id"})

    def __post_init__(self) -> None:
        for name, cls in (("mining", _mining_config_cls()), ("holdout", HoldoutConfig)):
            value = getattr(self, name)
            if value is None:
                setattr(self, name, cls())
            elif isinstance(value, dict):
                setattr(self, name, from_dict(cls, value, where=name))


# The fields that do not change a single output byte: excluded from the fingerprint.
_NOT_CONTENT = ("out", "num_proc", "input", "kb", "db", "aliases", "corpus", "allow_network")


# The files that decide a saved tokenizer's ids (not model weights that may share its directory).
_TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab*", "merges.txt", "*.model")


def content_config(cfg: PrepConfig) -> dict:
    d = asdict(cfg)
    for k in _NOT_CONTENT:
        d.pop(k, None)
    tok = Path(cfg.tokenizer)
    if tok.is_dir():
        # A local tokenizer is content by its files, not by where it lies: the fingerprint excludes paths.
        files = sorted({p.name for pat in _TOKENIZER_FILES for p in tok.glob(pat) if p.is_file()})
        d["tokenizer"] = "dir:" + fingerprint_files(tok, files)
    return d


# ---- building rows ----------------------------------------------------------------------------

def document_rows(tagger: Tagger, docs: list[Document], task: str) -> list[dict]:
    rows = []
    for d in docs:
        row = tagger.document_row(d, entity=(task == "el"))
        rows.append(dict(doc_id=d.doc_id, title=d.title, text=d.text, input_ids=row.input_ids, roles=row.roles))
    return rows


def _name_key(name: str) -> str:
    return " ".join(name.lower().split())


def mining_queries(ex, task: str, docs: dict[str, Document], positives: list[str], same_name: dict[str, list[str]]):
    """One mining query per RET position: the text a retriever would get at that point."""
    if task == "rag":
        queries = []
        for hop, gold in enumerate(positives):
            text = ex.question
            if hop > 0:
                prev = docs[positives[hop - 1]]
                text += " " + prev.title + " " + prev.text
            given = [d for d in ex.context_doc_ids if d not in ex.hops]
            queries.append(MiningQuery(key=f"{ex.example_id}#{hop}", text=text, gold=list(ex.hops), given=given))
        return queries
    queries = []
    linked = [m for m in ex.mentions if m.entity_id != NIL_ID]
    for j, (m, gold) in enumerate(zip(linked, positives)):
        ctx = ex.text[max(0, m.start - 100): m.end + 100]
        name = docs[gold].title
        given = [e for e in same_name.get(_name_key(name), []) if e != gold]
        queries.append(MiningQuery(key=f"{ex.example_id}#{j}", text=f"{ex.text[m.start:m.end]} {ctx}", gold=[gold], given=given))
    return queries


def query_row(tagger: Tagger, ex, task: str, docs: dict[str, Document]) -> tuple[dict, list[str]]:
    """Tag one example; raises InputError (unknown doc id) or TooLong."""
    if task == "rag":
        missing = [h for h in ex.hops if h not in docs]
        if missing:
            raise InputError(ex.source, ex.line, "hops", f"gold document {missing[0]!r} is not in the document pool", ex.example_id)
        row = tagger.rag_row(ex, docs)
        positives = list(ex.hops)
        extra = dict(question=ex.question, answer=ex.answer,
                     answers=list(dict.fromkeys([ex.answer] + list(ex.answer_aliases))),
                     candidates=list(ex.context_doc_ids), mentions=[])
    else:
        row, positives = tagger.link_row(ex)
        missing = [p for p in positives if p not in docs]
        if missing:
            raise InputError(ex.source, ex.line, "labels.entity_id", f"entity {missing[0]!r} is not in the entity KB", ex.example_id)
        extra = dict(question=ex.text, answer="", answers=[], candidates=[],
                     mentions=[dict(start=m.start, end=m.end, entity_id=m.entity_id) for m in ex.mentions])
    rets = ret_positions(row.roles).tolist()
    problems = check_row_invariants(row.roles, is_query=True)
    if len(rets) != len(positives):
        problems.append(f"{len(rets)} RET tokens but {len(positives)} positives")
    if problems:  # a bug in a template, not in the data: fail loudly
        raise AssertionError(f"example {ex.example_id}: {'; '.join(problems)}")
    out = dict(example_id=ex.example_id, task=task, input_ids=row.input_ids, roles=row.roles, ret_positions=rets,
               positives=positives, prompt_len=row.prompt_len, **extra)
    return out, positives


# ---- the worker -------------------------------------------------------------------------------
# Set in the parent before the pool forks; workers only read it (copy-on-write, no pickling).
_STATE: dict[str, Any] = {}


def _build_query_shard(index: int) -> dict:
    s = _STATE
    cfg: PrepConfig = s["cfg"]
    examples = s["examples"][index * cfg.shard_size:(index + 1) * cfg.shard_size]
    rows, quarantine, all_queries, spans, cut0, log0 = [], [], [], [], s["tagger"].cut_rows, len(s["tagger"].cut_log)
    for ex in examples:
        try:
            row, positives = query_row(s["tagger"], ex, s["task"], s["docs"])
        except TooLong as e:
            quarantine.append(dict(path=ex.source, line=ex.line, record_id=ex.example_id, field=None,
                                   reason=f"too long: {e}"))
            continue
        except InputError as e:
            if cfg.on_error == "fail":
                raise
            quarantine.append(e.as_quarantine())
            continue
        qs = mining_queries(ex, s["task"], s["docs"], positives, s["same_name"])
        spans.append((len(all_queries), len(qs)))
        all_queries.extend(qs)
        rows.append(row)
    mined = s["miner"].mine(all_queries) if all_queries else []
    for row, (start, n) in zip(rows, spans):
        negs = mined[start:start + n]
        row["negatives"] = [[x.doc_id for x in per] for per in negs]
        row["neg_source"] = [[x.source for x in per] for per in negs]
        for pos, per in zip(row["positives"], row["negatives"]):
            assert pos not in per, f"{row['example_id']}: a negative equals its positive {pos}"
    out_dir = Path(cfg.out) / "queries"
    qpath = out_dir / f"shard-{index:05d}.quarantine.jsonl"
    # The sidecar first, the shard last: a shard that exists always has its sidecar.
    atomic_write_bytes(qpath, "".join(json.dumps(q, ensure_ascii=False) + "\n" for q in quarantine).encode())
    write_cut_count(out_dir, index, s["tagger"].cut_rows - cut0, _take_cut_log(s["tagger"], log0))
    write_shard(shard_path(out_dir, index), rows, QUERIES_SCHEMA)
    return {"index": index, "rows": len(rows), "quarantined": len(quarantine)}


def _take_cut_log(tagger: Tagger, start: int) -> list[dict]:
    """This shard's entries of the tagger's cut log (removed from it: the log does not grow with the run)."""
    items = tagger.cut_log[start:]
    del tagger.cut_log[start:]
    return items


def _build_doc_shard(index: int) -> dict:
    s = _STATE
    cfg: PrepConfig = s["cfg"]
    docs, cut0 = s["doc_list"][index * cfg.doc_shard_size:(index + 1) * cfg.doc_shard_size], s["tagger"].cut_docs
    log0 = len(s["tagger"].cut_log)
    rows = document_rows(s["tagger"], docs, s["task"])
    # before the shard, as its sidecar
    write_cut_count(Path(cfg.out) / "docs", index, s["tagger"].cut_docs - cut0, _take_cut_log(s["tagger"], log0))
    write_shard(shard_path(Path(cfg.out) / "docs", index), rows, DOCS_SCHEMA)
    return {"index": index, "rows": len(rows)}


# ---- the stage --------------------------------------------------------------------------------

def _check_or_record_config(cfg: PrepConfig, out: Path) -> None:
    """A rerun into the same directory must use the same content config (else shards would mix)."""
    path = out / "prep_config.json"
    want = content_config(cfg)
    # The input files' hashes too: their paths are not content, but a rerun over an edited input
    # would otherwise resume with the old shards and mix two datasets.
    inputs = {} if cfg.from_hub else {f["role"]: f["sha256"] for f in input_fingerprints(cfg)}
    if path.exists():
        have = json.loads(path.read_text())
        if sha256_json(have.get("content", {})) != sha256_json(want):
            diff = sorted(k for k in set(have.get("content", {})) | set(want) if have.get("content", {}).get(k) != want.get(k))
            raise ConfigError(f"{out} was prepared with another config (differs in: {', '.join(diff)}); "
                              f"use a new --out directory or delete it")
        had = have.get("inputs")
        if had is not None and had != inputs:
            diff = sorted(k for k in set(had) | set(inputs) if had.get(k) != inputs.get(k))
            raise ConfigError(f"{out} was prepared from other input files (differs in: {', '.join(diff)}); "
                              f"use a new --out directory or delete it")
    else:
        atomic_write_json(path, {"content": want, "config": asdict(cfg), "inputs": inputs})


def _tokenizer(cfg: PrepConfig, ds: Dataset, out: Path, shared: bool = False, log=print):
    """``shared``: other job-array tasks may be creating ``out/tokenizer`` at the same time."""
    tok_dir = out / "tokenizer"
    if (tok_dir / "tokenizer_config.json").exists():  # a rerun: exactly the tokenizer of the shards written so far
        tokenizer = load_tokenizer(str(tok_dir))
    else:
        texts = None
        if cfg.tokenizer.startswith("bpe:"):  # both holdout parts' texts when split (data_prep.inputs)
            texts = ds.selection.get("tokenizer_texts") or corpus_texts(ds)
        tokenizer = load_tokenizer(cfg.tokenizer, texts=texts, allow_network=cfg.allow_network)
        if texts is not None:
            log(f"[prep] tokenizer: trained a byte-level BPE of {len(tokenizer)} tokens on this data "
                f"(tokenizer={cfg.tokenizer}, the default without --tokenizer); a pretrained model needs data "
                f"tokenised with its own tokenizer: --tokenizer <model dir> or smollm2")
    token_ids = add_special_tokens(tokenizer, cfg.tokens)
    tmp = out / (".tokenizer.tmp" if not shared else f".tokenizer.tmp-{socket.gethostname()}-{os.getpid()}")
    if not tok_dir.exists():
        tokenizer.save_pretrained(str(tmp))
        try:
            os.replace(tmp, tok_dir)
        except OSError:  # a concurrent job-array task saved it first (a directory rename never overwrites)
            if not shared or not (tok_dir / "tokenizer_config.json").exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    if shared:  # every task tags with the one saved tokenizer (a bpe:N trained per task may differ)
        tokenizer = load_tokenizer(str(tok_dir))
        token_ids = add_special_tokens(tokenizer, cfg.tokens)
    return tokenizer, token_ids


def parse_only_shards(spec: str) -> tuple[int, int]:
    """``"I/N"`` (task I of N, 0-based) -> (I, N)."""
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise ConfigError(f"--only-shards {spec!r}: expected I/N, e.g. 0/4 (task 0 of 4)") from None
    if n < 1 or not 0 <= i < n:
        raise ConfigError(f"--only-shards {spec!r}: need 0 <= I < N")
    return i, n


def prepare(cfg: PrepConfig, *, log=print, only_shards: tuple[int, int] | None = None, finish_only: bool = False) -> dict:
    """Run the whole stage; return the manifest.

    For a job array (``slurm/prep.sh``): ``only_shards=(i, n)`` writes only the query and doc shards
    whose index is ``i`` mod ``n`` and no manifest (returns a summary); ``finish_only`` then checks that
    every shard exists and writes quarantine.jsonl + the manifest exactly as a single run would.
    """
    if not cfg.out:
        raise ConfigError("no output directory: give --out DIR")
    t0 = time.time()
    out = Path(cfg.out)
    done = _open_out_dir(cfg, out, only_shards, log)
    if done is not None:
        return done
    ds, policy = _read(cfg, out, log)
    tokenizer, token_ids = _tokenizer(cfg, ds, out, shared=only_shards is not None, log=log)
    doc_list = [ds.documents[k] for k in sorted(ds.documents)]
    tagger, doc_lengths = _doc_length_tagger(cfg, out, tokenizer, token_ids, ds.task, doc_list, log)
    n_doc_shards = max(1, -(-len(ds.documents) // cfg.doc_shard_size))
    n_query_shards = max(1, -(-len(ds.examples) // cfg.shard_size))
    if finish_only:
        return _finish_slices(cfg, out, ds, tokenizer, policy, t0, log, n_doc_shards, n_query_shards, doc_lengths)
    same_name: dict[str, list[str]] = {}
    if ds.task == "el":
        for d in doc_list:
            same_name.setdefault(_name_key(d.title), []).append(d.doc_id)
    log(f"[prep] building the {'BM25' if cfg.mining.bm25 else ''}{' + dense' if cfg.mining.dense else ''} "
        f"negative miner over {len(doc_list)} documents")
    if warning := unstemmed_warning(cfg.mining):
        log(f"[prep] {warning}")
    miner = NegativeMiner(ds.documents, cfg.mining)

    _STATE.update(cfg=cfg, task=ds.task, tagger=tagger, docs=ds.documents, doc_list=doc_list,
                  examples=ds.examples, miner=miner, same_name=same_name)
    mine = (lambda i: i % only_shards[1] == only_shards[0]) if only_shards else (lambda i: True)
    todo_docs = [i for i in range(n_doc_shards) if mine(i) and not shard_path(out / "docs", i).exists()]
    todo_q = [i for i in range(n_query_shards) if mine(i) and not shard_path(out / "queries", i).exists()]
    own_q, own_docs = sum(map(mine, range(n_query_shards))), sum(map(mine, range(n_doc_shards)))
    if len(todo_q) < own_q or len(todo_docs) < own_docs:
        log(f"[prep] resuming: {own_q - len(todo_q)}/{own_q} query shards and "
            f"{own_docs - len(todo_docs)}/{own_docs} doc shards already finished")
    try:
        run_shards(_build_doc_shard, todo_docs, cfg.num_proc, "doc shards")
        run_shards(_build_query_shard, todo_q, cfg.num_proc, "query shards")
    finally:
        _STATE.clear()

    if only_shards is not None:
        # What the finishing step puts in the manifest (it builds no miner); identical from every task.
        atomic_write_json(out / _SLICE_PROVENANCE, miner.provenance())
        i, n = only_shards
        log(f"[prep] task {i}/{n}: wrote {len(todo_q)} query shard(s) and {len(todo_docs)} doc shard(s) "
            f"in {time.time() - t0:.1f} s; the manifest is written by --finish-only once every task is done")
        return {"only_shards": [i, n], "query_shards": todo_q, "doc_shards": todo_docs}
    return finish(cfg, out, ds, tokenizer, policy, t0, log, mining=miner.provenance(), doc_lengths=doc_lengths)


def _open_out_dir(cfg: PrepConfig, out: Path, only_shards, log) -> dict | None:
    """Create/check ``out``; the manifest when the directory is already complete (a rerun is a no-op)."""
    out.mkdir(parents=True, exist_ok=True)
    _check_or_record_config(cfg, out)
    if (out / MANIFEST_NAME).is_file():  # written last: the directory is complete
        manifest = json.loads((out / MANIFEST_NAME).read_text())
        log(f"[prep] {out} is already prepared (fingerprint {manifest.get('fingerprint', '?')[:12]}): nothing to do")
        return manifest
    for sub in ("docs", "queries"):
        (out / sub).mkdir(exist_ok=True)
        if only_shards is not None:  # the other tasks' temporaries are live writes, not leftovers
            continue
        removed = remove_stale_temporaries(out / sub)
        if removed:
            log(f"[prep] removed {removed} half-written temporary file(s) of an interrupted run")
    return None


def _read(cfg: PrepConfig, out: Path, log) -> tuple[Dataset, Any]:
    policy = ErrorPolicy(cfg.on_error)
    ds = read_inputs(cfg, policy)
    log(f"[prep] read {len(ds.examples)} {ds.task} examples and {len(ds.documents)} documents"
        + (f" ({policy.count} records quarantined)" if policy.count else ""))
    log(f"[prep] {holdout.describe(ds.selection)}")
    for note in ds.notes:
        log(f"[prep] note: {note}")
    if not ds.examples:
        if policy.count:  # the message points at it: it must exist
            atomic_write_bytes(out / "quarantine.jsonl", "".join(
                json.dumps(q.as_quarantine(), ensure_ascii=False, sort_keys=True) + "\n" for q in policy.quarantined).encode())
        raise ConfigError("no usable example in the input" + (f" ({policy.count} quarantined, see quarantine.jsonl)" if policy.count else ""))
    return ds, policy


def _doc_length_tagger(cfg: PrepConfig, out: Path, tokenizer, token_ids, task: str, doc_list: list[Document],
                       log) -> tuple[Tagger, dict]:
    """The tagger with ``max_doc_length`` resolved over the whole pool (data_prep.doclength), and its record."""
    tagger = Tagger(tokenizer, cfg.tokens, token_ids, cfg.tagging)
    entry = doclength.pool_doc_lengths(out, tagger, doc_list, task == "el", cfg.tagging)
    tagger.cfg = replace(tagger.cfg, max_doc_length=entry["chosen"])
    log(f"[prep] {doclength.describe(entry)}")
    return tagger, entry


def resolved_config(cfg: PrepConfig, doc_lengths: dict) -> dict:
    """The manifest's ``config``: ``cfg`` with ``tagging.max_doc_length`` as the number used (not ``auto``)."""
    d = asdict(cfg)
    d["tagging"]["max_doc_length"] = doc_lengths["chosen"]
    return d


_SLICE_PROVENANCE = ".mining_provenance.json"


def _finish_slices(cfg: PrepConfig, out: Path, ds: Dataset, tokenizer, policy, t0: float, log,
                   n_doc_shards: int, n_query_shards: int, doc_lengths: dict) -> dict:
    """The job array's last step: every shard must be there; then the manifest, as a single run writes it."""
    missing = [f"docs/{shard_path(out / 'docs', i).name}" for i in range(n_doc_shards)
               if not shard_path(out / "docs", i).exists()]
    missing += [f"queries/{shard_path(out / 'queries', i).name}" for i in range(n_query_shards)
                if not shard_path(out / "queries", i).exists()]
    if missing:
        raise ConfigError(f"{out}: {len(missing)} shard(s) missing ({', '.join(missing[:5])}"
                          f"{', ...' if len(missing) > 5 else ''}); rerun the job-array tasks (--only-shards I/N) first")
    for sub in ("docs", "queries"):  # leftovers of killed tasks (every task has ended by now)
        remove_stale_temporaries(out / sub)
    prov_path = out / _SLICE_PROVENANCE
    if prov_path.is_file():
        mining = json.loads(prov_path.read_text())
    else:  # shards written by other means (e.g. a killed single run): build the miner for its provenance
        mining = NegativeMiner(ds.documents, cfg.mining).provenance()
    manifest = finish(cfg, out, ds, tokenizer, policy, t0, log, mining=mining, doc_lengths=doc_lengths)
    prov_path.unlink(missing_ok=True)
    return manifest


def finish(cfg: PrepConfig, out: Path, ds: Dataset, tokenizer, policy, t0: float, log=print, mining: dict | None = None,
           *, doc_lengths: dict) -> dict:
    """Count, fingerprint and write quarantine.jsonl, truncated.jsonl, split_ids.json and the manifest (last)."""
    import pyarrow.compute  # noqa: F401  (pa.compute below; not imported by `import pyarrow` itself)

    shards = {}
    counts = {"docs": 0, "queries": 0, "ret_tokens": 0}
    tokens = {"docs": 0, "queries": 0}
    for sub in ("docs", "queries"):
        entries = []
        for p in list_shards(out / sub):
            with pa.memory_map(str(p)) as src:
                table = pa.ipc.open_stream(src).read_all()
            n = table.num_rows
            counts[sub] += n
            tokens[sub] += int(pa.compute.sum(pa.compute.list_value_length(table["input_ids"])).as_py() or 0)
            if sub == "queries":
                counts["ret_tokens"] += int(pa.compute.sum(pa.compute.list_value_length(table["ret_positions"])).as_py() or 0)
            entries.append({"name": p.name, "rows": n, "bytes": p.stat().st_size, "sha256": sha256_file(p)})
        shards[sub] = entries
    quarantine = [q.as_quarantine() if hasattr(q, "as_quarantine") else q for q in policy.quarantined]
    for side in sorted((out / "queries").glob("shard-*.quarantine.jsonl")):
        quarantine += [json.loads(line) for line in side.read_text().splitlines() if line.strip()]
    atomic_write_bytes(out / "quarantine.jsonl",
                       "".join(json.dumps(q, ensure_ascii=False, sort_keys=True) + "\n" for q in quarantine).encode())
    counts["quarantined"] = len(quarantine)
    tok_fp = tokenizer_fingerprint(tokenizer)
    fingerprint = sha256_json({"shards": {k: [(e["name"], e["sha256"]) for e in v] for k, v in shards.items()},
                               "tokenizer": tok_fp, "config": content_config(cfg)})
    size = sum(e["bytes"] for v in shards.values() for e in v)
    truncated = count_cuts(out, cfg.tagging.max_length, doc_lengths["chosen"])
    write_report(out)  # one line per cut row / document; its line count is truncated["rows"] + ["docs"]
    selection = {k: v for k, v in ds.selection.items() if k not in ("ids", "tokenizer_texts")}
    holdout.write_ids(out, selection, ds.selection["ids"])
    manifest = write_manifest(
        out, "data_prep", fingerprint=fingerprint, task=ds.task, kind=cfg.kind,
        config=resolved_config(cfg, doc_lengths), inputs=input_fingerprints(cfg) if not cfg.from_hub else [{"hub": cfg.from_hub, "split": cfg.split}],
        tokenizer={"source": cfg.tokenizer, "fingerprint": tok_fp, "vocab_size": len(tokenizer),
                   "special_token_ids": add_special_tokens(tokenizer, cfg.tokens), "eos_token_id": tokenizer.eos_token_id},
        tokenizer_source=describe_source(cfg.tokenizer),
        counts=counts, tokens=tokens, bytes=size, shards=shards, notes=ds.notes, truncated=truncated,
        doc_lengths=doc_lengths, holdout=selection, mining=mining or {"config": asdict(cfg.mining)},
    )
    log(f"[prep] wrote {counts['queries']} query rows ({tokens['queries']} tokens, {counts['ret_tokens']} RET) and "
        f"{counts['docs']} documents ({tokens['docs']} tokens), {size / 1e6:.1f} MB, to {out} in {time.time() - t0:.1f} s")
    if cut := describe_cuts(truncated, counts["queries"], counts["docs"]):
        log(f"[prep] {cut}")
        log(f"[prep] each cut row / document: {out / REPORT}")
    if quarantine:
        log(f"[prep] {len(quarantine)} record(s) quarantined with their reasons in {out / 'quarantine.jsonl'}")
    return manifest
