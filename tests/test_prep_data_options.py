"""Issue #18's data-prep options: HotpotQA hop leads (``lead_from``), ``tagging.max_doc_length=auto``
with every cut listed in truncated.jsonl, PyStemmer for BM25 mining, and the train / held-out split by
question id (``holdout.*``). Tiny generated inputs run everywhere; the real samples in ../shared/data
are skipped with the reason where absent.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pyarrow as pa
import pytest

from conftest import shared_file
from data_prep import doclength, holdout, mining
from data_prep.inputs import read_inputs
from data_prep.mining import EnglishStemmer, MiningConfig, MiningQuery, NegativeMiner, unstemmed_warning
from data_prep.prepare import PrepConfig, prepare
from data_prep.readers.errors import ErrorPolicy
from data_prep.readers.leads import apply_hop_leads
from data_prep.records import Dataset, Document, MultiHopExample
from data_prep.tagging import TaggingConfig
from onegen.config import help_text, load_config
from onegen.errors import ConfigError

HOTPOT_DISTRACTOR = "hotpotqa/hipporag_hotpot_train_distractor100.json"
TWOWIKI_SAMPLE = "2wikimultihopqa/2wiki_dev_sample500.json.gz"
CITIES = ["Paris", "Lyon", "Turin", "Porto", "Ghent", "Basel", "Leeds", "Graz"]


def hotpot(i: int, long: int = 0) -> dict:
    """A bridge question: hop 1 (Company{i}, named in the question) names hop 2 (Founder{i})."""
    a, b, city = f"Founder{i}", f"Company{i}", CITIES[i % len(CITIES)]
    return {
        "_id": f"q{i:03d}", "question": f"Where was the founder of {b} born?", "answer": city, "type": "bridge",
        "supporting_facts": [[b, 0], [a, 1]],
        "context": [
            [b, [f"{b} is a firm.", f" It was founded by {a}."]],
            [a, [f"{a} is an engineer.", f" {a} was born in {city}."] + [f" In {y} he built a bridge." for y in range(long)]],
            [f"Other{i}", [f"Other{i} is a town near {CITIES[(i + 1) % len(CITIES)]}."]],
        ],
    }


def elevant(i: int, sentences: int = 6) -> dict:
    labels, text = [], ""
    for k in range(sentences):
        name = f"Person{i}x{k}"
        labels.append({"span": [len(text), len(text) + len(name)], "entity_id": f"Q{i}{k}", "name": name})
        text += f"{name} moved to {CITIES[k % len(CITIES)]} last year. "
    return {"id": i, "text": text.strip(), "labels": labels}


def write_json(path: Path, records: list[dict]) -> Path:
    path.write_text(json.dumps(records))
    return path


def prep(tmp_path: Path, src: Path, name: str, *overrides: str, log=None, **kw) -> dict:
    cfg = load_config(PrepConfig, None, [f"input={src}", f"out={tmp_path / name}", "tokenizer=bpe:300",
                                         "kind=hotpotqa", *overrides])
    lines: list[str] = []
    manifest = prepare(cfg, log=lines.append if log is None else log, **kw)
    manifest["_log"] = lines
    return manifest


def rows(out: Path, sub: str = "queries") -> list[dict]:
    result = []
    for p in sorted((out / sub).glob("shard-*.arrow")):
        with pa.memory_map(str(p)) as f:
            result += pa.ipc.open_stream(f).read_all().to_pylist()
    return result


def _cfg(src: Path, *overrides: str) -> PrepConfig:
    return load_config(PrepConfig, None, [f"input={src}", "kind=hotpotqa", *overrides])


# ---- 1. hop leads ---------------------------------------------------------------------------

def test_hotpot_rows_lead_each_hop_with_its_paragraph_title(tmp_path):
    from transformers import AutoTokenizer

    src = write_json(tmp_path / "hp.json", [hotpot(i) for i in range(6)])
    m = prep(tmp_path, src, "title")
    note = [n for n in m["notes"] if n.startswith("hop leads:")]
    assert note and note[0].startswith("hop leads: 6 of 6 examples got leads from their gold paragraph titles"), m["notes"]
    assert "hop 1's title is named in the question in 6 of 6, hop 2's title in hop 1's paragraph in 6 of 6" in note[0]
    assert m["config"]["lead_from"] == "auto" and any(l.startswith("[prep] note: hop leads: 6 of 6") for l in m["_log"])
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "title" / "tokenizer"))
    row = rows(tmp_path / "title")[0]
    text = tok.decode(row["input_ids"])
    assert " Search: Company0[RQ]" in text and " Search: Founder0[RQ]" in text, text

    plain = prep(tmp_path, src, "none", "lead_from=none")
    text = tok.decode(rows(tmp_path / "none")[0]["input_ids"])
    assert text.count(" Search:[RQ]") == 2 and "Search: Company0" not in text, text
    assert plain["fingerprint"] != m["fingerprint"]
    with pytest.raises(ConfigError, match="another config .*lead_from"):  # the option is part of the prepared config
        prep(tmp_path, src, "title", "lead_from=none")


def _twowiki_ds() -> Dataset:
    docs = {t: Document(t, t, f"{t} text") for t in ("A", "B", "C")}
    ex = MultiHopExample("w1", "Who is the father of A's mother?", "C", ["A", "B"], ["A", "B", "C"],
                         hop_leads=["A mother", "B father"])
    return Dataset(task="rag", examples=[ex], documents=docs)


def test_lead_from_keeps_2wiki_evidence_by_default_and_is_checked():
    ds = _twowiki_ds()
    note = apply_hop_leads(ds, "2wiki", "auto")
    assert ds.examples[0].hop_leads == ["A mother", "B father"] and note.startswith("hop leads: 1 of 1 examples have leads from the input file")
    apply_hop_leads(ds, "2wiki", "title")
    assert ds.examples[0].hop_leads == ["A", "B"]
    apply_hop_leads(ds, "2wiki", "none")
    assert ds.examples[0].hop_leads is None
    el = Dataset(task="el", examples=[], documents={})
    assert apply_hop_leads(el, "elevant", "auto") is None
    with pytest.raises(ConfigError, match="lead_from=title: hop leads are for multi-hop kinds"):
        apply_hop_leads(el, "elevant", "title")
    with pytest.raises(ConfigError, match="not one of"):
        load_config(PrepConfig, None, ["lead_from=titles"])


@pytest.mark.shared_data
def test_real_hotpot_examples_all_get_title_leads():
    ds = read_inputs(_cfg(shared_file(HOTPOT_DISTRACTOR)), ErrorPolicy("fail"))
    assert all(ex.hop_leads == [ds.documents[h].title for h in ex.hops] for ex in ds.examples)
    assert any(n.startswith(f"hop leads: {len(ds.examples)} of {len(ds.examples)} examples got leads") for n in ds.notes)


# ---- 2. max_doc_length=auto, truncated.jsonl --------------------------------------------------

def test_nearest_rank_percentiles_and_resolution():
    assert doclength.nearest_rank(list(range(1, 101)), 99) == 99
    assert doclength.nearest_rank(list(range(1, 101)), 50) == 50
    assert doclength.nearest_rank([5] * 10 + [900], 99) == 900  # 11 documents: p99 is the longest
    assert doclength.nearest_rank([], 99) == 0
    lengths = list(range(1, 101)) + [1000]
    auto = doclength.resolve(TaggingConfig(), lengths)
    assert (auto["chosen"], auto["cut"], auto["p50"], auto["max"]) == (100, 1, 51, 1000), auto
    assert doclength.resolve(TaggingConfig(max_doc_length_cap=40), lengths)["chosen"] == 40
    fixed = doclength.resolve(TaggingConfig(max_doc_length=128), lengths)
    assert fixed["requested"] == fixed["chosen"] == 128 and fixed["cut"] == 1
    with pytest.raises(ConfigError, match=r"expected an integer or one of \['auto'\], got 'autoo'"):
        load_config(PrepConfig, None, ["tagging.max_doc_length=autoo"])
    with pytest.raises(ConfigError, match="max_doc_length=1': must be >= 2"):
        load_config(PrepConfig, None, ["tagging.max_doc_length=1"])


def test_auto_doc_length_is_resolved_once_and_every_cut_is_listed(tmp_path):
    # Two documents per record get long; p50 makes a small pool cut about half of its documents.
    src = write_json(tmp_path / "hp.json", [hotpot(i, long=3 * i) for i in range(12)])
    m = prep(tmp_path, src, "auto", "tagging.max_doc_length_percentile=50", "tagging.max_length=160", "doc_shard_size=10")
    out = tmp_path / "auto"
    dl = m["doc_lengths"]
    docs = rows(out, "docs")
    assert dl["requested"] == "auto" and dl["docs"] == len(docs) == 36 and dl["chosen"] == dl["p50"]
    assert m["config"]["tagging"]["max_doc_length"] == dl["chosen"] == m["truncated"]["max_doc_length"]
    assert json.loads((out / "prep_config.json").read_text())["content"]["tagging"]["max_doc_length"] == "auto"
    assert max(len(r["input_ids"]) for r in docs) == dl["chosen"] and dl["cut"] == m["truncated"]["docs"] > 0
    report = [json.loads(l) for l in (out / "truncated.jsonl").read_text().splitlines()]
    cut_docs = {r["doc_id"]: r for r in report if "doc_id" in r}
    cut_rows = {r["example_id"]: r for r in report if "example_id" in r}
    assert len(cut_docs) == dl["cut"] and len(cut_rows) == m["truncated"]["rows"] > 0
    lengths = {r["doc_id"]: len(r["input_ids"]) for r in docs}
    for doc_id, n in lengths.items():  # the lengths it resolved from are the rows' own uncut lengths
        if doc_id in cut_docs:
            assert cut_docs[doc_id]["tokens"] > n == cut_docs[doc_id]["kept"] == dl["chosen"]
        else:
            assert n <= dl["chosen"]
    q = {r["example_id"]: len(r["input_ids"]) for r in rows(out)}
    assert all(q[e] == r["kept"] <= 160 < r["tokens"] for e, r in cut_rows.items())
    assert any("document rows: 36 documents, tokens p50" in l and f"max_doc_length {dl['chosen']} (auto = p50" in l
               for l in m["_log"]), m["_log"]


def test_job_array_tasks_resolve_the_same_doc_length(tmp_path):
    src = write_json(tmp_path / "hp.json", [hotpot(i, long=3 * i) for i in range(12)])
    opts = ("tagging.max_doc_length_percentile=50", "doc_shard_size=7", "shard_size=4")
    single = prep(tmp_path, src, "single", *opts)
    out = tmp_path / "array"
    prep(tmp_path, src, "array", *opts, only_shards=(0, 2))
    first = json.loads((out / doclength.CACHE).read_text())
    (out / doclength.CACHE).unlink()  # task 1 computes it again, from the whole pool, not its slice
    prep(tmp_path, src, "array", *opts, only_shards=(1, 2))
    assert json.loads((out / doclength.CACHE).read_text()) == first == single["doc_lengths"]
    finished = prep(tmp_path, src, "array", *opts, finish_only=True)
    assert finished["fingerprint"] == single["fingerprint"] and finished["doc_lengths"] == single["doc_lengths"]
    assert (out / "truncated.jsonl").read_text() == (tmp_path / "single" / "truncated.jsonl").read_text() != ""


@pytest.mark.shared_data
def test_real_2wiki_documents_at_128_and_auto():
    """The cut that motivated auto: at 128 SmolLM2 tokens 914 of the 3,301 paragraphs lost their end (the
    prepared shards agree: ``[prep] cut ... 914 of 3301 documents to 128 tokens``); p99 is 666 tokens, so
    auto takes the cap, 512, and cuts 73."""
    from data_prep.tagging import Tagger
    from data_prep.tokenizer import load_tokenizer
    from onegen.tokens import SpecialTokens, add_special_tokens

    ds = read_inputs(_cfg(shared_file(TWOWIKI_SAMPLE), "kind=2wiki"), ErrorPolicy("fail"))
    tok = load_tokenizer("smollm2")
    tagger = Tagger(tok, SpecialTokens(), add_special_tokens(tok, SpecialTokens()), TaggingConfig())
    lengths = tagger.document_lengths([ds.documents[k] for k in sorted(ds.documents)])
    assert len(lengths) == 3301
    assert doclength.resolve(TaggingConfig(max_doc_length=128), lengths)["cut"] == 914
    auto = doclength.resolve(TaggingConfig(), lengths)
    assert (auto["p50"], auto["p90"], auto["p99"], auto["max"]) == (81, 255, 666, 1042), auto
    assert (auto["chosen"], auto["cut"]) == (512, 73), auto


# ---- 3. PyStemmer ---------------------------------------------------------------------------

def _pool() -> dict[str, Document]:
    words = ["running runners", "houses housing", "cats", "dogs barking", "trees"]
    return {f"d{i:02d}": Document(f"d{i:02d}", f"T{i}", f"{words[i % 5]} item {i} {words[(i * 3) % 5]}")
            for i in range(40)}


def test_stemmer_pickles_and_stems():
    pytest.importorskip("Stemmer", reason="PyStemmer is a requirement of setup.py: pip install -e .")
    stem = pickle.loads(pickle.dumps(EnglishStemmer()))
    assert stem("running") == "run" and stem("houses") == "hous"
    miner = NegativeMiner(_pool(), MiningConfig(rank_window=[1, 20]))
    assert miner.provenance()["bm25"]["stemmer"] == "PyStemmer:english"
    queries = [MiningQuery("k", "run house", ["d00"])]
    again = pickle.loads(pickle.dumps(miner))  # what a spawned worker would receive
    assert again.mine(queries) == miner.mine(queries) and miner.mine(queries)[0]
    assert unstemmed_warning(MiningConfig()) is None


def test_without_pystemmer_bm25_runs_unstemmed_with_one_warning(tmp_path, monkeypatch):
    monkeypatch.setattr(mining, "stemmer_available", lambda: False)
    assert NegativeMiner(_pool(), MiningConfig()).provenance()["bm25"]["stemmer"] is None
    assert unstemmed_warning(MiningConfig(stem=False)) is None
    src = write_json(tmp_path / "hp.json", [hotpot(i) for i in range(4)])
    m = prep(tmp_path, src, "unstemmed")
    warnings = [l for l in m["_log"] if "warning" in l]
    assert warnings == ["[prep] warning: mining.stem=true but PyStemmer is not installed: BM25 mining runs UNSTEMMED "
                        "(pip install PyStemmer, a requirement of setup.py; or set mining.stem=false)"], m["_log"]
    assert m["mining"]["bm25"]["stemmer"] is None


# ---- 4. held-out split by question id --------------------------------------------------------

def test_membership_is_a_function_of_id_and_seed():
    ids = [f"q{i}" for i in range(2000)]
    held = {i for i in ids if holdout.is_heldout(i, 0.2, 0)}
    assert 0.17 < len(held) / len(ids) < 0.23
    assert held == {i for i in ids if holdout.is_heldout(i, 0.2, 0)}
    assert held != {i for i in ids if holdout.is_heldout(i, 0.2, 1)}
    assert not any(holdout.is_heldout(i, 0.0, 0) for i in ids) and all(holdout.is_heldout(i, 1.0, 0) for i in ids)
    with pytest.raises(ConfigError, match=r"holdout.fraction must be in \[0, 1\]"):
        load_config(PrepConfig, None, ["holdout.fraction=1.5"])


def test_train_and_heldout_parts_are_disjoint_and_cover_the_file(tmp_path):
    src = write_json(tmp_path / "hp.json", [hotpot(i) for i in range(40)])
    all_ids = {f"q{i:03d}" for i in range(40)}
    split = ("holdout.fraction=0.3", "holdout.seed=7")
    train = prep(tmp_path, src, "train", "holdout.part=train", *split)
    held = prep(tmp_path, src, "held", "holdout.part=heldout", *split)
    ids = {name: {r["example_id"] for r in rows(tmp_path / name)} for name in ("train", "held")}
    assert ids["train"].isdisjoint(ids["held"]) and ids["train"] | ids["held"] == all_ids and ids["held"]
    for name, m in (("train", train), ("held", held)):
        h = m["holdout"]
        assert (h["fraction"], h["seed"], h["rule"]) == (0.3, 7, holdout.RULE)
        assert h["kept"] == len(ids[name]) and h["dropped"] == 40 - len(ids[name])
        listed = json.loads((tmp_path / name / "split_ids.json").read_text())
        assert listed["ids"] == sorted(ids[name]) and listed["ids_sha256"] == h["ids_sha256"] == holdout.ids_sha256(listed["ids"])
    assert train["holdout"]["part"] == "train" and held["holdout"]["part"] == "heldout"
    assert any(l.startswith(f"[prep] holdout: part=heldout (fraction 0.3, seed 7): kept {len(ids['held'])}")
               for l in held["_log"])
    # bpe:N trained on both parts: a model trained on one reads the other's ids
    assert train["tokenizer"]["fingerprint"] == held["tokenizer"]["fingerprint"]
    # another seed, another membership; --max-examples applies after the split
    other = prep(tmp_path, src, "seed8", "holdout.part=heldout", "holdout.fraction=0.3", "holdout.seed=8")
    assert {r["example_id"] for r in rows(tmp_path / "seed8")} != ids["held"]
    capped = prep(tmp_path, src, "cap", "holdout.part=train", *split, "max_examples=5")
    kept = [r["example_id"] for r in rows(tmp_path / "cap")]
    assert kept == sorted(ids["train"])[:5] and capped["holdout"]["dropped_by_max_examples"] == len(ids["train"]) - 5
    assert other["fingerprint"] != held["fingerprint"]


def test_entity_linking_splits_texts_before_passages(tmp_path):
    src = tmp_path / "el.jsonl"
    src.write_text("".join(json.dumps(elevant(i)) + "\n" for i in range(30)))
    parts = {}
    for part in ("train", "heldout"):
        cfg = load_config(PrepConfig, None, [f"input={src}", "kind=elevant", "el_max_chars=80",
                                             f"holdout.part={part}", "holdout.fraction=0.4"])
        ds = read_inputs(cfg, ErrorPolicy("fail"))
        assert all("#p" in ex.example_id for ex in ds.examples)  # every text was cut into passages
        parts[part] = {ex.example_id.split("#p")[0] for ex in ds.examples}
        assert sorted(parts[part]) == sorted(ds.selection["ids"])
    assert parts["train"].isdisjoint(parts["heldout"]) and parts["train"] | parts["heldout"] == {str(i) for i in range(30)}


def test_help_config_lists_the_new_fields():
    text = help_text(PrepConfig)
    for name in ("lead_from = 'auto'", "holdout.part = 'all'", "holdout.fraction = 0.2", "holdout.seed = 0",
                 "tagging.max_doc_length = 'auto'", "tagging.max_doc_length_cap = 512",
                 "tagging.max_doc_length_percentile = 99.0"):
        assert name in text, name


def test_an_unresolved_auto_tagger_uses_the_cap():
    """Inference without a dataset builds its tagger from default templates: its paragraph budget is a number."""
    from data_prep.tagging import Tagger
    from data_prep.tokenizer import load_tokenizer
    from onegen.tokens import SpecialTokens, add_special_tokens

    tok = load_tokenizer("bpe:300", texts=[f"Company{i} was founded by Founder{i}." for i in range(50)])
    ids = add_special_tokens(tok, SpecialTokens())
    tagger = Tagger(tok, SpecialTokens(), ids, TaggingConfig(max_doc_length_cap=300))
    assert tagger.cfg.max_doc_length == 300
    long = Document("d", "Company1", " ".join(f"Founder{i} was here." for i in range(200)))
    assert len(tagger.document_row(long).input_ids) == 300 and tagger.cut_log[0]["kept"] == 300
