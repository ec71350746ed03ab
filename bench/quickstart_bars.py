"""Check a finished default quickstart against the bars of the front-door issue (#14).

    bash scripts/quickstart.sh && python bench/quickstart_bars.py runs/quickstart

The default run takes ~17 minutes, too long for CI, so this reads its ``summary.json`` instead of
running it. Bars: >= 40 questions per method; OneGen EM >= 0.6 and >= 0.2 above no-retrieval and both
pipelines; OneGen free Recall@1 >= 0.9 and above both pipelines'; two-pass gives OneGen's answers at a
higher time per question; wall time <= 15 minutes with set-up. Exit 1 when a bar fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def check(summary: dict, predictions: dict[str, list[str]]) -> list[tuple[str, bool, str]]:
    m = {k: v["headline"] for k, v in summary["methods"].items()}
    one = m["onegen"]
    rows = [("questions per method >= 40", all(v["n"] >= 40 for v in m.values()), str({k: v["n"] for k, v in m.items()})),
            ("OneGen EM >= 0.6", one["em"] >= 0.6, f"{one['em']:.3f}")]
    for base in ("no-retrieval", "pipeline-bm25", "pipeline-minilm"):
        rows.append((f"OneGen EM >= {base} + 0.2", one["em"] >= m[base]["em"] + 0.2, f"{one['em']:.3f} vs {m[base]['em']:.3f}"))
    rows.append(("OneGen free Recall@1 >= 0.9", one["recall_at_1_free"] >= 0.9, f"{one['recall_at_1_free']:.3f}"))
    for base in ("pipeline-bm25", "pipeline-minilm"):
        rows.append((f"OneGen free Recall@1 > {base}", one["recall_at_1_free"] > m[base]["recall_at_1_free"],
                     f"{one['recall_at_1_free']:.3f} vs {m[base]['recall_at_1_free']:.3f}"))
    same = predictions.get("onegen") == predictions.get("two-pass")
    rows.append(("two-pass gives OneGen's answers", same, "identical" if same else "differ"))
    rows.append(("two-pass costs more per question", m["two-pass"]["s_per_question"] > one["s_per_question"],
                 f"{m['two-pass']['s_per_question']:.3f} vs {one['s_per_question']:.3f} s"))
    wall = (summary["wall_s"] + summary.get("setup_s", 0)) / 60
    rows.append(("wall time <= 15 min with set-up", wall <= 15, f"{wall:.1f} min"))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("out", nargs="?", default="runs/quickstart", help="the quickstart's --out")
    out = Path(p.parse_args(argv).out)
    summary = json.loads((out / "summary.json").read_text())
    answers = {}
    for label in ("onegen", "two-pass"):
        lines = (out / "eval" / label / "predictions.jsonl").read_text().splitlines()
        answers[label] = [json.loads(line)["answer"] for line in lines if line.strip()]
    rows = check(summary, answers)
    for name, ok, got in rows:
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {got}")
    return 0 if all(ok for _, ok, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
