"""The prepared dataset's Arrow schemas (design §2): typed, no int64 blow-up, roles as int8."""

from __future__ import annotations

import pyarrow as pa

DOCS_SCHEMA = pa.schema(
    [
        ("doc_id", pa.string()),
        ("title", pa.string()),
        ("text", pa.string()),
        ("input_ids", pa.list_(pa.int32())),
        ("roles", pa.list_(pa.int8())),
    ]
)

MENTION_TYPE = pa.struct([("start", pa.int32()), ("end", pa.int32()), ("entity_id", pa.string())])

QUERIES_SCHEMA = pa.schema(
    [
        ("example_id", pa.string()),
        ("task", pa.string()),  # "rag" | "el"
        ("input_ids", pa.list_(pa.int32())),
        ("roles", pa.list_(pa.int8())),
        ("ret_positions", pa.list_(pa.int32())),  # exactly where roles == RET
        ("positives", pa.list_(pa.string())),  # one doc id per RET position
        ("negatives", pa.list_(pa.list_(pa.string()))),  # per RET position
        ("neg_source", pa.list_(pa.list_(pa.string()))),  # provenance, parallel to negatives
        ("candidates", pa.list_(pa.string())),  # the question's own paragraphs (distractor setting)
        ("question", pa.string()),  # RAG: the question; EL: the original text
        ("answer", pa.string()),
        ("answers", pa.list_(pa.string())),  # answer aliases, answer first
        ("mentions", pa.list_(MENTION_TYPE)),  # EL gold (NIL included); empty for RAG
        ("prompt_len", pa.int32()),  # tokens of the CTX prefix that inference is given
    ]
)
