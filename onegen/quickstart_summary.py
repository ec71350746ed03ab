"""The quickstart's ``summary.md`` / ``summary.json``: one row per method (which generator, which
retriever), 95% bootstrap intervals, EM per question type, and the wall time with and without set-up."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from onegen.bootstrap import question_ci
from onegen.methods import METHODS

RETRIEVER = {m.name: m.retrieves_with for m in METHODS.values()}
KEYS = [("em", "EM"), ("f1", "F1"), ("recall_at_1_free", "Recall@1 (free)"),
        ("recall_at_1_tf", "Recall@1 (teacher-forced)"), ("s_per_question", "s / question")]
WITH_CI = {"em": "em", "recall_at_1_free": "hop_recall_at_1"}  # headline key -> per-question score


def write_summary(out: Path, preset: Any, world: Path, wall: float, ns: Any) -> dict:
    rows = {label: _method_row(out / "eval" / label, ckpt) for label, ckpt, _ in preset.methods}
    types = _question_types(world / "raw" / "dev.json")
    setup = float(os.environ.get("ONEGEN_SETUP_S", "0") or 0)
    title = (f"# Quickstart result ({time.strftime('%Y-%m-%d')}, preset {ns.preset}{', small' if ns.small else ''}: "
             f"{preset.about}; {os.cpu_count()} CPU cores)")
    lines = [title, "",
             f"Wall time: **{(wall + setup) / 60:.1f} min** with set-up ({setup / 60:.1f} min: `.venv` and installs), "
             f"**{wall / 60:.1f} min** without. n = {_n(rows)} held-out questions per method (entities never seen in "
             f"training), distractor setting; decoding {preset.gen_batch_size} question(s) at a time, so s / question "
             f"is {'a throughput' if preset.gen_batch_size > 1 else 'a latency'}. Brackets: 95% bootstrap intervals "
             "over questions.", "",
             "| method | generator | retriever | " + " | ".join(k[1] for k in KEYS) + " |",
             "|---" * (len(KEYS) + 3) + "|"]
    for label, r in rows.items():
        cells = [_cell(r, key) for key, _ in KEYS]
        lines.append(f"| {label} | {r['generator']} | {RETRIEVER.get(label, label)} | " + " | ".join(cells) + " |")
    lines += ["", "EM by question type:", "", "| method | " + " | ".join(f"{t} (n={n})" for t, n in _type_counts(rows, types))
              + " |", "|---" * (len(_type_counts(rows, types)) + 1) + "|"]
    for label, r in rows.items():
        lines.append(f"| {label} | " + " | ".join(_fmt(v) for v in _em_by_type(r, types).values()) + " |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    result = {"wall_s": wall, "setup_s": setup, "methods": {k: {**v["metrics"], "generator": v["generator"],
                                                                 "em_by_type": _em_by_type(v, types)}
                                                             for k, v in rows.items()}}
    (out / "summary.json").write_text(json.dumps(result, indent=2, default=str))
    return result


def _method_row(res: Path, ckpt: str) -> dict:
    metrics = json.loads((res / "metrics.json").read_text())
    preds_path = res / "predictions.jsonl"
    preds = [json.loads(line) for line in preds_path.read_text().splitlines() if line.strip()] if preds_path.exists() else []
    return {"metrics": metrics, "preds": preds, "generator": f"train-{ckpt}"}


def _cell(r: dict, key: str) -> str:
    value = r["metrics"].get("headline", {}).get(key)
    score = WITH_CI.get(key)
    if value is None or score is None:
        return _fmt(value)
    ci = question_ci(r["preds"], score)
    return _fmt(value) if ci is None else f"{_fmt(value)} [{ci.low:.2f}, {ci.high:.2f}]"


def _question_types(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    return {q["_id"]: q.get("type", "?") for q in json.loads(path.read_text())}


def _type_counts(rows: dict, types: dict[str, str]) -> list[tuple[str, int]]:
    first = next(iter(rows.values()))["preds"]
    found: dict[str, int] = {}
    for p in first:
        t = types.get(p["example_id"], "?")
        found[t] = found.get(t, 0) + 1
    return sorted(found.items())


def _em_by_type(r: dict, types: dict[str, str]) -> dict[str, float]:
    by: dict[str, list[float]] = {}
    for p in r["preds"]:
        by.setdefault(types.get(p["example_id"], "?"), []).append(p["scores"]["em"])
    return {t: sum(v) / len(v) for t, v in sorted(by.items())}


def _n(rows: dict) -> int:
    return int(next(iter(rows.values()))["metrics"].get("headline", {}).get("n", 0))


def _fmt(v) -> str:
    return "—" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)
