"""Evaluation: one-pass inference, the document index, baselines, and the metrics of design §6.

Modules (each one job; importing this package imports none of them, so ``metrics`` stays cheap):

* ``metrics``        answer EM/F1, recall by doc id, entity-linking strong match (pure, stdlib only)
* ``checks``         ``preflight(model_dir, data_dir)``: manifests, shard sizes, tokenizer match; no torch
* ``precision``      ``resolve_precision(device, dtype, attn)``: the dtype + attention kernel a run uses
* ``runtime``        ``load_runtime(model_dir, data)``: model + tokenizer + tagger, checked against the data
* ``index``          ``build_index`` / ``open_index`` / ``DocIndex.search`` (faiss over ``[RD]``/``[SE]`` states)
* ``doc_select``     which documents an index holds (all, or the first N rows' own) and their encoding order
* ``index_reuse``    ``ensure_index``: reuse an index that serves the request (subset rules), else build one
* ``kv``             ``KVSession``: a context decoded through the KV cache, forwards counted;
                     ``BatchedKV``: several contexts through one batched cache
* ``retrievers``     ``Retriever`` protocol: OneGen (one pass), TwoPass, BM25, Dense, No retrieval
* ``generate``       ``answer_row`` / ``run_questions`` / ``run_dialogue`` with ``GenerationConfig``
* ``align``          marked EL output -> character spans of the original text
* ``linking``        ``link_row`` / ``run_linking`` / ``summarize_linking``; given the gold mentions,
                     ``gold_link_accuracy`` and the ``name_match_baseline``
* ``scoring``        ``summarize_rag``: EM/F1, Recall@k, hop Recall@1 of free generation, costs
* ``teacher_forced`` ``teacher_forced_recall``: Recall@1 per hop from gold rows, against the index
* ``tasks``          the RAG and EL passes of a run: generate, score, prediction records, headline metrics
* ``run``            the ``run`` command: files, metrics.json, plots, MLflow run
* ``tracking``       MLflow for evaluation runs, linked to their training run by a tag
* ``compare``/``plots`` ``python -m evaluation compare``: the side-by-side table, PNG, CSV, markdown
* ``cli``            ``python -m evaluation`` argument parsing

Typical use::

    data = open_prepared("runs/world/rag_dev")
    build_index(model_dir, "runs/world/rag_dev", "runs/index/rag_dev")
    rt = load_runtime(model_dir, data)
    idx = open_index("runs/index/rag_dev", model_dir)
    results = run_questions(rt, OneGenRetriever(idx), GenerationConfig(max_hops=2))
    print(summarize_rag(results, k=5), teacher_forced_recall(rt, idx))
"""
