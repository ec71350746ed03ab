"""How much the pipelines' teacher-forced Recall@1 depends on what they are queried with.

``evaluation run`` queries a pipeline retriever with the question + everything the model wrote
before ``[RQ]`` (its leads; inserted paragraphs left out). At hop 2 that query still names hop 1's
entity, so a lexical or dense retriever may find hop 1's paragraph again. This bench scores, on the
same gold rows and candidates, three query forms for BM25 and MiniLM:

  full      question + every lead so far (what ``evaluation run`` uses)
  latest    question + the lead just before this [RQ]
  lead      the lead just before this [RQ] alone

    python bench/pipeline_queries.py runs/benchmark-cpu/data/hotpotqa-heldout --rows 30
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from data_prep.records import Document
from data_prep.tokenizer import load_tokenizer
from onegen.environment import apply_offline_defaults
from onegen.roles import GEN
from pipeline.data import open_prepared

FORMS = ("full", "latest", "lead")  # = evaluation.retrievers.PIPELINE_QUERIES


def hop_queries(tokenizer, row: dict) -> list[dict[str, str]]:
    """Per gold [RQ] of a row: the query text of each form."""
    # heavy (evaluation.retrievers loads torch): imported where used, so --help starts fast
    from evaluation.retrievers import RetrievalStep

    ids, roles, p0 = list(row["input_ids"]), list(row["roles"]), int(row["prompt_len"])
    out, start = [], p0
    for pos in row["ret_positions"]:
        every = tokenizer.decode([ids[t] for t in range(p0, int(pos)) if roles[t] == GEN], skip_special_tokens=True)
        lead = tokenizer.decode([ids[t] for t in range(start, int(pos)) if roles[t] == GEN], skip_special_tokens=True)
        step = RetrievalStep(question=row["question"], generated_text=every, k=1, latest_text=lead)
        out.append({form: step.pipeline_query(form) for form in FORMS})  # the forms evaluation run queries with
        start = int(pos) + 1
    return out


def main(argv: list[str] | None = None) -> int:
    apply_offline_defaults()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("data", help="a prepared RAG dataset (held-out part)")
    p.add_argument("--rows", type=int, default=40, help="the first N rows (as evaluation run --max-examples)")
    p.add_argument("--out", help="write the table as JSON here")
    ns = p.parse_args(argv)
    # heavy (torch, transformers): imported after apply_offline_defaults and the arguments, so --help starts fast
    from data_prep.encoders import MeanPoolEncoder, default_minilm_path
    from evaluation.retrievers import BM25Retriever, DenseRetriever  # lazy: as above

    data = open_prepared(ns.data)
    tok = load_tokenizer(str(Path(ns.data) / "tokenizer"))
    rows = data.query_rows(list(range(min(ns.rows, len(data)))))
    docs = [Document(d["doc_id"], d["title"], d["text"]) for d in data.docs.select_columns(["doc_id", "title", "text"])]
    bm25 = BM25Retriever(docs)
    dense = DenseRetriever(MeanPoolEncoder(default_minilm_path(), device="cpu"), docs)
    table: dict[str, dict[str, dict[str, float]]] = {}
    for name in ("bm25", "minilm"):
        for form in FORMS:
            hits: dict[int, list[int]] = {}
            for row in rows:
                cands = list(row["candidates"])
                for j, (q, gold) in enumerate(zip(hop_queries(tok, row), row["positives"])):
                    if name == "bm25":
                        s = bm25.scores(q[form])
                        pos = [bm25.position[c] for c in cands]
                        top = max(pos, key=lambda i: s[i])
                        found = bm25.doc_ids[top]
                    else:
                        found = dense.index.search(dense.encoder.encode([q[form]]), 1, [cands])[0][0][0]
                    hits.setdefault(j, []).append(int(found == gold))
            allh = [h for v in hits.values() for h in v]
            table.setdefault(name, {})[form] = {"all": sum(allh) / len(allh),
                                                **{f"hop{j + 1}": sum(v) / len(v) for j, v in sorted(hits.items())}}
    print(f"teacher-forced Recall@1 of the pipelines on {ns.data} ({len(rows)} rows, distractor candidates)")
    print("| retriever | query | all | " + " | ".join(k for k in table["bm25"]["full"] if k != "all") + " |")
    for name, forms in table.items():
        for form, v in forms.items():
            print(f"| {name} | {form} | {v['all']:.3f} | " + " | ".join(f"{x:.3f}" for k, x in v.items() if k != "all") + " |")
    if ns.out:
        Path(ns.out).write_text(json.dumps(table, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
