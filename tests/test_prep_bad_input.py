"""Bad input through the CLI: a one-line ``error: FILE:LINE, record ..., field '...': reason`` and a
non-zero exit (no traceback); with ``--on-error skip`` the bad records go to quarantine.jsonl, one
reason each, the count is reported on stdout, and the good records are prepared.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from conftest import ROOT


def run_cli(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "data_prep", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


# ---- tiny valid records ---------------------------------------------------------------------

CITIES = ["Paris", "Lyon", "Turin", "Porto", "Ghent", "Basel", "Leeds", "Graz"]


def hotpot(i: int) -> dict:
    a, b = f"Founder{i}", f"Company{i}"
    return {
        "_id": f"q{i}",
        "question": f"Where was the founder of {b} born?",
        "answer": CITIES[i % len(CITIES)],
        "type": "bridge",
        "supporting_facts": [[b, 0], [a, 1]],
        "context": [
            [b, [f"{b} is a firm.", f" It was founded by {a}."]],
            [a, [f"{a} is an engineer.", f" {a} was born in {CITIES[i % len(CITIES)]}."]],
            [f"Other{i}", [f"Other{i} is a town near {CITIES[(i + 1) % len(CITIES)]}."]],
            [f"Museum{i}", [f"Museum{i} shows paintings.", " It opened in spring."]],
        ],
    }


def elevant(i: int) -> dict:
    name, city = f"Person{i}", CITIES[i % len(CITIES)]
    text = f"{name} moved to {city} last year."
    return {"id": i, "title": f"doc{i}", "text": text, "evaluation_span": [0, len(text)], "labels": [
        {"id": 0, "span": [0, len(name)], "entity_id": f"Q{100 + i}", "name": name, "type": "PER"},
        {"id": 1, "span": [text.index(city), text.index(city) + len(city)], "entity_id": f"Q{900 + i % len(CITIES)}",
         "name": city, "type": "LOC"},
    ]}


def _without(d: dict, key: str) -> dict:
    return {k: v for k, v in d.items() if k != key}


def _with(d: dict, **kw) -> dict:
    return {**d, **kw}


# Each case: (kind, bad record or raw line, expected record id or None, field or None, reason regex)
CASES = {
    "hotpot_malformed_json": ("hotpotqa", '{"_id": "q3", "question": ', None, None, r"malformed JSON"),
    "hotpot_missing_field": ("hotpotqa", _without(hotpot(3), "answer"), "q3", "answer", r"missing field"),
    "hotpot_fact_missing_paragraph": ("hotpotqa", _with(hotpot(3), supporting_facts=[["Company3", 0], ["Nowhere", 0]]),
                                      "q3", "supporting_facts[1][0]", r"paragraph 'Nowhere'.*not in context"),
    "hotpot_fact_missing_sentence": ("hotpotqa", _with(hotpot(3), supporting_facts=[["Company3", 0], ["Founder3", 7]]),
                                     "q3", "supporting_facts[1][1]", r"sentence index 7 out of range"),
    "hotpot_duplicate_id": ("hotpotqa", _with(hotpot(3), _id="q1"), "q1", "_id", r"duplicate _id \(first seen at line 1\)"),
    "hotpot_empty_question": ("hotpotqa", _with(hotpot(3), question="   "), "q3", "question", r"empty text"),
    "hotpot_wrong_type": ("hotpotqa", _with(hotpot(3), answer=5), "q3", "answer", r"expected string, got integer"),
    "el_malformed_json": ("elevant", '{"id": 3, "text": "x" "labels": []}', None, None, r"malformed JSON"),
    "el_span_outside_text": ("elevant", _with(elevant(3), labels=[{"span": [0, 999], "entity_id": "Q1", "name": "X"}]),
                             "3", "labels[0].span", r"span \[0, 999\] outside the text"),
    "el_missing_entity_id": ("elevant", _with(elevant(3), labels=[{"span": [0, 4], "name": "X"}]),
                             "3", "labels[0].entity_id", r"missing field"),
    "el_duplicate_id": ("elevant", _with(elevant(3), id=1), "1", "id", r"duplicate document id"),
    "el_empty_text": ("elevant", _with(elevant(3), text="", labels=[]), "3", "text", r"empty text"),
}
MAKERS = {"hotpotqa": hotpot, "elevant": elevant}
BAD_LINE = 3


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_record_fails_with_one_line_error(tmp_path, case):
    kind, bad, rid, field, reason = CASES[case]
    make = MAKERS[kind]
    path = write_jsonl(tmp_path / "input.jsonl", [make(1), make(2), bad, make(4)])
    r = run_cli("prepare", "--kind", kind, "--input", str(path), "--out", str(tmp_path / "out"))
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    want = rf"error: {re.escape(str(path))}:{BAD_LINE}"
    if rid is not None:
        want += rf", record '{re.escape(rid)}'"
    if field is not None:
        want += rf", field '{re.escape(field)}'"
    want += rf": .*{reason}.*"
    assert re.fullmatch(want, lines[0]), f"{lines[0]!r} !~ {want!r}"
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_json_list_errors_name_the_record_index(tmp_path):
    path = tmp_path / "input.json"
    path.write_text(json.dumps([hotpot(1), _without(hotpot(2), "question")]))
    r = run_cli("prepare", "--kind", "hotpotqa", "--input", str(path), "--out", str(tmp_path / "out"))
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip() == f"error: {path} (record 2), record 'q2', field 'question': missing field"


def test_missing_input_file_and_missing_flag(tmp_path):
    r = run_cli("prepare", "--kind", "hotpotqa", "--input", str(tmp_path / "nope.json"), "--out", str(tmp_path / "o"))
    assert r.returncode != 0 and r.stderr.strip() == f"error: {tmp_path / 'nope.json'}: file not found"
    r = run_cli("prepare", "--kind", "hotpotqa", "--out", str(tmp_path / "o2"))
    assert r.returncode != 0 and r.stderr.strip().startswith("error: no input") and "Traceback" not in r.stderr


def _skip_file(tmp_path: Path, kind: str) -> tuple[Path, list[str], dict[int, str]]:
    """Every bad case of ``kind``, each followed by a good record; returns (path, good ids, {bad line: case})."""
    make = MAKERS[kind]
    rows, good, bad = [make(1), make(2)], [1, 2], {}
    for n, (case, (k, rec, *_)) in enumerate(sorted(CASES.items())):
        if k != kind:
            continue
        if not isinstance(rec, str) and "duplicate" not in case:  # an id of its own, never a good record's
            rec = _with(rec, **({"_id": f"bad{n}"} if kind == "hotpotqa" else {"id": 1000 + n}))
        rows.append(rec)
        bad[len(rows)] = case
        rows.append(make(10 + n))
        good.append(10 + n)
    ids = [f"q{g}" for g in good] if kind == "hotpotqa" else [str(g) for g in good]
    return write_jsonl(tmp_path / "input.jsonl", rows), ids, bad


def _check_skip_run(out: Path, stdout: str, good: list[str], bad: dict[int, str], path: Path) -> None:
    quarantine = [json.loads(l) for l in (out / "quarantine.jsonl").read_text().splitlines() if l.strip()]
    assert sorted(q["line"] for q in quarantine) == sorted(bad), quarantine
    for q in quarantine:
        assert q["path"] == str(path) and q["reason"], q
        assert re.search(CASES[bad[q["line"]]][4], q["reason"]), (bad[q["line"]], q["reason"])
    assert f"{len(bad)} record(s) quarantined" in stdout, stdout
    assert f"({len(bad)} records quarantined)" in stdout, stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["quarantined"] == len(bad)
    assert manifest["counts"]["queries"] == len(good)
    ids = []
    for p in sorted((out / "queries").glob("shard-*.arrow")):
        with pa.memory_map(str(p)) as src:
            ids += pa.ipc.open_stream(src).read_all().column("example_id").to_pylist()
    assert sorted(ids) == sorted(good)


def test_on_error_skip_hotpotqa_cli(tmp_path):
    path, good, bad = _skip_file(tmp_path, "hotpotqa")
    assert len(bad) == sum(k == "hotpotqa" for k, *_ in CASES.values())
    out = tmp_path / "out"
    r = run_cli("prepare", "--kind", "hotpotqa", "--input", str(path), "--out", str(out), "--on-error", "skip",
                "--tokenizer", "bpe:400")
    assert r.returncode == 0, r.stderr
    _check_skip_run(out, r.stdout, good, bad, path)


def test_on_error_skip_elevant_in_process(tmp_path, capsys):
    from data_prep.__main__ import main

    path, good, bad = _skip_file(tmp_path, "elevant")
    out = tmp_path / "out"
    assert main(["prepare", "--kind", "elevant", "--input", str(path), "--out", str(out), "--on-error", "skip",
                 "--tokenizer", "bpe:400"]) == 0
    _check_skip_run(out, capsys.readouterr().out, good, bad, path)


def test_on_error_skip_with_nothing_usable_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "input.jsonl", [_without(hotpot(1), "answer"), "{oops"])
    r = run_cli("prepare", "--kind", "hotpotqa", "--input", str(path), "--out", str(tmp_path / "out"), "--on-error", "skip")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip() == "error: no usable example in the input (2 quarantined, see quarantine.jsonl)"
    quarantine = [json.loads(l) for l in (tmp_path / "out" / "quarantine.jsonl").read_text().splitlines()]
    assert [(q["line"], q["field"]) for q in quarantine] == [(1, "answer"), (2, None)]


# ---- found outside the catalogue (issue #14): BOM, truncated gzip, a directory, rows cut to fit ----

def _records(path: Path) -> list[str]:
    from data_prep.readers.jsonio import iter_records

    return [r.data["_id"] for r in iter_records(path)]


def test_utf8_bom_is_read_as_utf8_sig(tmp_path):
    rows = [hotpot(1), hotpot(2)]
    listed = tmp_path / "bom.json"
    listed.write_bytes(b"\xef\xbb\xbf" + json.dumps(rows, indent=1).encode())
    lines = tmp_path / "bom.jsonl"
    lines.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in rows).encode())
    gz = tmp_path / "bom.json.gz"
    gz.write_bytes(gzip.compress(listed.read_bytes()))
    for p in (listed, lines, gz):
        assert _records(p) == ["q1", "q2"], p


def test_truncated_or_corrupt_gzip_is_one_named_error(tmp_path):
    from onegen.errors import OneGenError

    text = "".join(json.dumps(hotpot(i)) + "\n" for i in range(1, 30))
    for name, payload in (("lines.jsonl.gz", text), ("list.json.gz", json.dumps([hotpot(i) for i in range(1, 30)]))):
        full = gzip.compress(payload.encode())
        p = tmp_path / name
        p.write_bytes(full[: len(full) // 2])
        with pytest.raises(OneGenError) as e:
            _records(p)
        assert str(e.value) == f"{p} is truncated (gzip stream ended early after {len(full) // 2} bytes): re-download it"
    bad_crc = bytearray(gzip.compress(text.encode()))
    bad_crc[-8] ^= 0xFF  # the CRC32 of the trailer
    p = tmp_path / "crc.jsonl.gz"
    p.write_bytes(bytes(bad_crc))
    with pytest.raises(OneGenError, match=re.escape(f"{p} is not a readable gzip file (") + r".*\): re-download it"):
        _records(p)


def test_a_directory_is_not_a_file(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    r = run_cli("prepare", "--kind", "hotpotqa", "--input", str(d), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and r.stderr.strip() == f"error: {d}/ is a directory; --input takes a file", r.stderr
    for name in ("a.json", "b.jsonl.gz", "c.jsonl", "d.json", "notes.txt"):
        (d / name).write_text("[]")
    sub = tmp_path / "kbdir"
    (sub / "inner").mkdir(parents=True)
    (sub / "inner" / "kb.jsonl").write_text("")
    from data_prep.readers.jsonio import check_input_file
    from onegen.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        check_input_file(d, "--input")
    assert str(e.value) == (f"{d}/ is a directory; --input takes a file (did you mean {d}/a.json or {d}/b.jsonl.gz or "
                            f"{d}/c.jsonl, ... (4 in all)?)")
    with pytest.raises(ConfigError, match=re.escape(f"--kb takes a file (did you mean {sub}/inner/kb.jsonl?)")):
        check_input_file(sub, "--kb")


def _prep_cut(tmp_path: Path, out: Path, *extra: str) -> dict:
    from data_prep.prepare import PrepConfig, prepare
    from onegen.config import load_config

    long = hotpot(4)
    long["context"][1][1] = long["context"][1][1] + [f" In {y} he built a bridge near Graz." for y in range(1990, 2010)]
    src = write_jsonl(tmp_path / "long.jsonl", [hotpot(1), hotpot(2), hotpot(3), long, hotpot(5), long | {"_id": "q6"}])
    lines: list[str] = []
    cfg = load_config(PrepConfig, None, [f"input={src}", f"out={out}", "tokenizer=bpe:300", "kind=hotpotqa",
                                         "shard_size=2", "tagging.max_length=256", "tagging.max_doc_length=64", *extra])
    prepare(cfg, log=lines.append)
    return {"manifest": json.loads((out / "manifest.json").read_text()), "log": lines}


def test_rows_and_documents_cut_to_fit_are_counted_and_said(tmp_path):
    out = tmp_path / "out"
    first = _prep_cut(tmp_path, out)
    cut = first["manifest"]["truncated"]
    assert cut["rows"] == 2 and cut["max_length"] == 256 and cut["max_doc_length"] == 64, cut
    n_docs = first["manifest"]["counts"]["docs"]
    assert 1 <= cut["docs"] < n_docs and "uncounted_shards" not in cut
    assert f"[prep] cut 2 of 6 rows to 256 tokens and {cut['docs']} of {n_docs} documents to 64 tokens" in \
        "\n".join(first["log"])
    # Every row really fits, and the cut rows are exactly the long ones.
    lengths = {}
    for p in sorted((out / "queries").glob("shard-*.arrow")):
        with pa.memory_map(str(p)) as src:
            t = pa.ipc.open_stream(src).read_all()
        lengths.update(zip(t.column("example_id").to_pylist(), map(len, t.column("input_ids").to_pylist())))
    assert max(lengths.values()) <= 256 and lengths["q4"] == lengths["q6"] == 256, lengths
    # A resumed run (manifest and one query shard gone) counts the same: the finished shards keep their count.
    (out / "manifest.json").unlink()
    (out / "queries" / "shard-00001.arrow").unlink()
    again = _prep_cut(tmp_path, out)
    assert again["manifest"]["truncated"] == cut
    # Nothing cut: zeros in the manifest, no line.
    none = _prep_cut(tmp_path, tmp_path / "roomy", "tagging.max_length=4096", "tagging.max_doc_length=4096")
    assert none["manifest"]["truncated"]["rows"] == none["manifest"]["truncated"]["docs"] == 0
    assert not any(line.startswith("[prep] cut") for line in none["log"])
