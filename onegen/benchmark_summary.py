"""The benchmark's report: ``summary.md`` / ``summary.json`` / ``benchmark.png`` from the stages' outputs.

Per QA dataset one row per method (all share the trained generator: only the retriever differs):
EM, F1, Recall@1 teacher-forced and free per hop, Recall@5, s/question, n, with 95% bootstrap
intervals over questions where per-question scores exist. Per EL dataset: the KB's size, micro-F1
(GERBIL strong match), mention-detection F1, OneGen's linking accuracy on gold mentions and the
name-match baseline's. Then the data (split, quarantined records by reason, cut rows), the held-out
curves of training, the wall time by stage, and the issue's bars, each met or not.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

from onegen.benchmark_plot import plot_benchmark
from onegen.bootstrap import question_ci

RAG_COLS = [("em", "EM"), ("f1", "F1"), ("recall_at_1_tf", "R@1 tf"), ("recall_at_1_tf_hop1", "tf hop1"),
            ("recall_at_1_tf_hop2", "tf hop2"), ("recall_at_1_free", "R@1 free"), ("recall_at_1_free_hop1", "free hop1"),
            ("recall_at_1_free_hop2", "free hop2"), ("recall_at_5", "R@5"), ("s_per_question", "s/q"), ("n", "n")]
EL_COLS = [("kb_size", "KB"), ("n", "texts"), ("el_f1", "micro-F1"), ("el_precision", "P"), ("el_recall", "R"),
           ("el_md_f1", "MD F1"), ("el_link_acc_gold", "link acc (gold mentions)"),
           ("el_name_match_acc_gold", "name match (gold mentions)")]
CI_SCORES = {"em": "em", "f1": "f1", "recall_at_1_free": "hop_recall_at_1"}  # headline key -> per-question score


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _preds(res: Path) -> list[dict]:
    p = res / "predictions.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.exists() else []


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def _with_ci(value: Any, preds: list[dict], key: str) -> tuple[str, list[float] | None]:
    score = CI_SCORES.get(key)
    ci = question_ci(preds, score) if score and value is not None else None
    return (f"{_fmt(value)} [{ci.low:.2f}, {ci.high:.2f}]" if ci else _fmt(value)), ([ci.low, ci.high] if ci else None)


def rag_tables(out: Path, layout: dict) -> dict[str, dict[str, dict]]:
    """{dataset: {method: {"headline": ..., "ci": {key: [lo, hi]}, "cells": [...]}}} for every finished eval."""
    tables: dict[str, dict[str, dict]] = {}
    for name in layout["rag"]:
        rows: dict[str, dict] = {}
        for method in layout["methods"]:
            res = out / "eval" / f"{name}-{method}"
            m = _read_json(res / "metrics.json")
            if not m:
                continue
            head, preds, cells, cis = m.get("headline", {}), _preds(res), [], {}
            for key, _ in RAG_COLS:
                text, ci = _with_ci(head.get(key), preds, key)
                cells.append(text)
                if ci:
                    cis[key] = ci
            rows[method] = {"headline": head, "ci": cis, "cells": cells}
        tables[name] = rows
    return tables


def el_table(out: Path, layout: dict) -> dict[str, dict]:
    rows = {}
    for name in layout["el"]:
        m = _read_json(out / "eval" / f"{name}-onegen" / "metrics.json")
        if m:
            head = m.get("headline", {})
            rows[name] = {"headline": head, "cells": [_fmt(head.get(k)) for k, _ in EL_COLS]}
    return rows


def _reason_kind(rec: dict) -> str:
    """A quarantine reason without its values (titles, indices), so records that failed alike count together;
    each record with its own values stays in the dir's quarantine.jsonl."""
    field_ = re.sub(r"\[\d+\]", "[i]", str(rec.get("field") or "-"))
    reason = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", str(rec.get("reason", "?")))
    reason = re.sub(r"\b\d+\b", "N", reason)
    return f"{field_}: {reason[:100]}"


def data_report(out: Path) -> list[dict]:
    """Each prepared dir: rows, the split it holds, quarantined records by reason, cut rows."""
    report = []
    for d in sorted((out / "data").glob("*")):
        man = _read_json(d / "manifest.json")
        if not man:
            continue
        reasons: Counter = Counter()
        q = d / "quarantine.jsonl"
        if q.exists():
            for line in q.read_text().splitlines():
                if line.strip():
                    rec = json.loads(line)
                    reasons[_reason_kind(rec)] += 1
        counts = man.get("counts", {})
        report.append({"dir": d.name, "task": man.get("task"), "queries": counts.get("queries"), "docs": counts.get("docs"),
                       "quarantined": counts.get("quarantined", 0), "reasons": dict(reasons.most_common()),
                       "truncated": man.get("truncated"), "split": man.get("holdout") or man.get("split")})
    return report


def _split_ids(d: Path) -> set[str]:
    ids = (_read_json(d / "split_ids.json") or {}).get("ids")
    return set(map(str, ids or []))


def shared_questions(layout: dict) -> dict[str, int | None]:
    """Per evaluated dataset: how many of its question (text) ids are also in a training dir (``split_ids.json``).
    QA ids are the benchmarks' own global ids, so every QA training dir counts; EL ids are positions in one file,
    so only that dataset's own training part does. None: an id list is missing."""
    trains = {Path(d): _split_ids(Path(d)) for d in layout["train_dirs"]}  # each read once
    qa = [ids for d, ids in trains.items() if (_read_json(d / "manifest.json") or {}).get("task") == "rag"]

    def shared(held: str, seen: list[set[str]]) -> int | None:
        ids = _split_ids(Path(held))
        return None if not ids or not all(seen) else len(set().union(*(ids & s for s in seen)))

    out = {name: shared(held, qa) for name, held in layout["rag"].items()}
    out.update({name: shared(held, [ids for d, ids in trains.items() if d.name.startswith(f"{name}-train")])
                for name, held in layout["el"].items()})
    return out


def curves(out: Path) -> list[dict]:
    """The training run's rows that carry a held-out evaluation or a loss (metrics.jsonl)."""
    p = out / "train-onegen" / "metrics.jsonl"
    if not p.exists():
        return []
    by_step: dict[int, dict] = {}  # a step's losses and its held-out evaluation are separate rows
    for line in p.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            by_step.setdefault(r["step"], {"step": r["step"]}).update(
                {k: v for k, v in r.items() if k in ("loss_gen", "loss_ret") or k.startswith("eval/")})
    return [by_step[k] for k in sorted(by_step)]


def training_cost(out: Path) -> dict:
    """Median step time and peak memory of the training run (metrics.jsonl), what the CPU budget is made of."""
    p = out / "train-onegen" / "metrics.jsonl"
    rows = [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.exists() else []
    steps = sorted(r["step_s"] for r in rows if r.get("step_s") is not None)
    peaks = [r["peak_mem_mb"] for r in rows if r.get("peak_mem_mb") is not None]
    return {"steps": max((r["step"] for r in rows), default=0),
            "median_step_s": steps[len(steps) // 2] if steps else None,
            "peak_mem_gb": max(peaks) / 1024 if peaks else None}


def check_bars(rag: dict[str, dict[str, dict]], el: dict[str, dict], shared: dict[str, int | None]) -> list[dict]:
    """The issue's bars: per QA dataset OneGen's teacher-forced Recall@1 above each pipeline's and its EM
    above no-retrieval's; per EL dataset gold-mention linking above name match; and no evaluated question
    among the training ones. None: not measured."""
    bars = [{"bar": f"{name}: no evaluated question is in training", "ok": None if n is None else n == 0,
             "detail": f"{_fmt(n)} shared"} for name, n in shared.items()]

    def bar(text: str, a: Any, b: Any) -> None:
        ok = None if a is None or b is None else bool(a > b)
        bars.append({"bar": text, "ok": ok, "detail": f"{_fmt(a)} vs {_fmt(b)}"})

    for name, rows in rag.items():
        one = rows.get("onegen", {}).get("headline", {})
        for base in ("pipeline-bm25", "pipeline-minilm"):
            bar(f"{name}: onegen R@1 tf > {base}", one.get("recall_at_1_tf"),
                rows.get(base, {}).get("headline", {}).get("recall_at_1_tf"))
        bar(f"{name}: onegen EM > no-retrieval", one.get("em"), rows.get("no-retrieval", {}).get("headline", {}).get("em"))
    for name, row in el.items():
        h = row["headline"]
        bar(f"{name}: onegen gold-mention link acc > name match", h.get("el_link_acc_gold"), h.get("el_name_match_acc_gold"))
    return bars


def _wall_line(wall: float, seconds: dict) -> str:
    """This invocation's wall time; when it reused finished stages, also what all the stages took when they ran
    (else a rerun that only redid the comparison would read as a 0.1-minute benchmark)."""
    ran = sum(s for s in seconds.values() if s)
    if ran > 1.1 * wall + 60:
        return (f"Wall time **{wall / 60:.1f} min** for this invocation, which reused finished stages; the stages "
                f"took **{ran / 60:.1f} min** when they ran (by stage below).")
    return f"Wall time **{wall / 60:.1f} min**."


def _markdown(out: Path, cfg: Any, rag: dict, el: dict, data: list[dict], curve: list[dict], bars: list[dict],
              seconds: dict, wall: float) -> str:
    lines = [f"# Benchmark result ({time.strftime('%Y-%m-%d')}, {cfg.name}: {cfg.train.recipe}, "
             f"{os.cpu_count()} CPU cores)", "",
             f"{_wall_line(wall, seconds)} Held-out parts only (split by question id, recorded in each manifest), "
             f"distractor setting, normalisation {cfg.eval.normalization}. Every method uses the one trained generator; "
             "only the retriever differs. Brackets: 95% bootstrap intervals over questions.", ""]
    for name, rows in rag.items():
        lines += [f"## {name}", "", "| method | " + " | ".join(c for _, c in RAG_COLS) + " |", "|---" * (len(RAG_COLS) + 1) + "|"]
        lines += [f"| {m} | " + " | ".join(r["cells"]) + " |" for m, r in rows.items()] + [""]
    if el:
        lines += ["## Entity linking (onegen; KB: the benchmark's own entities, names only unless a KB file is given)", "",
                  "| dataset | " + " | ".join(c for _, c in EL_COLS) + " |", "|---" * (len(EL_COLS) + 1) + "|"]
        lines += [f"| {n} | " + " | ".join(r["cells"]) + " |" for n, r in el.items()] + [""]
    lines += ["## Bars", ""] + [f"- {'met' if b['ok'] else 'NOT met' if b['ok'] is False else 'not measured'}: "
                                f"{b['bar']} ({b['detail']})" for b in bars] + [""]
    lines += ["## Data", "", "| prepared | task | rows | docs | quarantined | cut | split |", "|---" * 7 + "|"]
    for d in data:
        split = d["split"] or {}
        lines.append(f"| {d['dir']} | {d['task']} | {d['queries']} | {d['docs']} | {d['quarantined']} | "
                     f"{_fmt(_cut_total(d['truncated']))} | {split.get('part', 'all') if isinstance(split, dict) else split} |")
    for d in data:
        for reason, n in d["reasons"].items():
            lines.append(f"- {d['dir']}: {n} quarantined — {reason}")
    cost = training_cost(out)
    lines += ["", f"Training: {cost['steps']} steps, median {_fmt(cost['median_step_s'])} s a step, peak memory "
                  f"{_fmt(cost['peak_mem_gb'])} GB (process RSS high-water mark, metrics.jsonl)."]
    if curve:
        keys = sorted({k for r in curve for k in r if k.startswith("eval/") and "retrieval_acc" in k})
        lines += ["", "## Training curves (held-out teacher-forced retrieval accuracy, loss_gen)", "",
                  "| step | loss_gen | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
        for r in curve:
            if any(k in r for k in keys):
                lines.append(f"| {r['step']} | {_fmt(r.get('loss_gen'))} | " + " | ".join(_fmt(r.get(k)) for k in keys) + " |")
    lines += ["", "## Wall time by stage", "", "| stage | s |", "|---|---|"]
    lines += [f"| {k} | {'reused' if v is None else f'{v:.0f}'} |" for k, v in seconds.items()]
    lines.append(f"| **all stages** | **{sum(v or 0 for v in seconds.values()):.0f}** |")
    return "\n".join(lines) + "\n"


def _cut_total(truncated: Any) -> str | None:
    """``"7 rows, 73 docs"``: what data_prep shortened to fit (each listed in the dir's truncated.jsonl)."""
    if not isinstance(truncated, dict):
        return None
    return f"{truncated.get('rows', 0)} rows, {truncated.get('docs', 0)} docs"


def write_summary(out: Path, cfg: Any, layout: dict, wall: float) -> dict:
    rag, el = rag_tables(out, layout), el_table(out, layout)
    data, curve, bars = data_report(out), curves(out), check_bars(rag, el, shared_questions(layout))
    seconds = layout.get("seconds", {})
    (out / "summary.md").write_text(_markdown(out, cfg, rag, el, data, curve, bars, seconds, wall))
    result = {"wall_s": wall, "rag": {n: {m: {"headline": r["headline"], "ci": r["ci"]} for m, r in rows.items()}
                                      for n, rows in rag.items()},
              "el": {n: r["headline"] for n, r in el.items()}, "data": data, "curves": curve, "bars": bars,
              "seconds": seconds, "training": training_cost(out)}
    (out / "summary.json").write_text(json.dumps(result, indent=2, default=str))
    plot_benchmark(out / "benchmark.png", rag, el, curve)
    return result
