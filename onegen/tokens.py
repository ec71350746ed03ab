"""The special tokens of OneGen, how they are added to a tokenizer, and the tokenizer's fingerprint.

RAG: ``[RQ]`` (retrieval query, emitted by the model while answering), ``[RD]`` (after each
document), ``<paragraph>`` … ``</paragraph>`` around an inserted document. Entity linking: ``[LK]``
after each marked mention, ``[SE]`` after each entity description, the filler ``[CON]`` forced
after ``[LK]``. Names are configurable; the description of each token seeds its embedding row
(mean of the description's sub-token embeddings, done by ``pipeline.model``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from tokenizers import AddedToken


@dataclass
class SpecialTokens:
    rq: str = field(default="[RQ]", metadata={"help": "retrieval-query token emitted by the model (RAG)"})
    rd: str = field(default="[RD]", metadata={"help": "token appended to every document (RAG)"})
    para_open: str = field(default="<paragraph>", metadata={"help": "opens an inserted document"})
    para_close: str = field(default="</paragraph>", metadata={"help": "closes an inserted document"})
    lk: str = field(default="[LK]", metadata={"help": "token after each marked mention (entity linking)"})
    se: str = field(default="[SE]", metadata={"help": "token after each entity description (entity linking)"})
    con: str = field(default="[CON]", metadata={"help": "filler forced after [LK] (entity linking)"})
    mention_open: str = field(default="<m>", metadata={"help": "opens a marked mention (entity linking)"})
    descriptions: dict[str, str] = field(
        default_factory=lambda: {
            "rq": "information of question",
            "rd": "information of document",
            "para_open": "paragraph start",
            "para_close": "paragraph end",
            "lk": "information of entity mention",
            "se": "information of entity",
            "con": "continue",
            "mention_open": "mention start",
        },
        metadata={"help": "short text whose sub-token embeddings seed each new token's rows"},
    )

    KEYS = ("rq", "rd", "para_open", "para_close", "lk", "se", "con", "mention_open")

    def all_tokens(self) -> list[str]:
        return [getattr(self, k) for k in self.KEYS]

    def query_ret_tokens(self) -> list[str]:
        """Tokens whose hidden state is a query embedding."""
        return [self.rq, self.lk]

    def doc_ret_tokens(self) -> list[str]:
        """Tokens whose hidden state is a document embedding."""
        return [self.rd, self.se]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SpecialTokens":
        return cls(**d)


def add_special_tokens(tokenizer: Any, tokens: SpecialTokens) -> dict[str, int]:
    """Add the OneGen tokens to a HF tokenizer once (idempotent); return ``{token: id}``.

    They are added as special tokens (never split, not normalised) so they survive
    ``save_pretrained``. A pad token is set (to EOS) when the tokenizer has none.
    """
    wanted = tokens.all_tokens()
    existing = set(tokenizer.get_vocab())
    missing = [t for t in wanted if t not in existing]
    if missing:
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in wanted}
    for t, i in ids.items():
        if i is None or i == tokenizer.unk_token_id:
            raise ValueError(f"special token {t!r} could not be added to the tokenizer")
    return ids



def base_vocab_size(tokenizer: Any, tokens: SpecialTokens) -> int:
    """The tokenizer's length before the OneGen tokens were added (design §8: "new" means an id at
    or past it).

    ``add_special_tokens`` appends the missing tokens last, so the new ones are the run of OneGen
    ids ending at ``len(tokenizer) - 1``. A OneGen token the base vocabulary already had sits below
    that run and keeps its trained rows. Not the embedding matrix's size: Qwen2 pads its matrix
    (151,936 rows) past its ~151,650 tokens, so new ids fall *inside* the matrix.
    """
    ids = {tokenizer.convert_tokens_to_ids(t) for t in tokens.all_tokens()}
    n = len(tokenizer)
    while n - 1 in ids:
        n -= 1
    return n


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of what decides token ids: the vocabulary (added tokens included) and the class.

    ``data_prep`` records it in the prepared data's manifest, the export in the model's; the trainer and
    evaluation refuse data whose fingerprint is not their tokenizer's (``onegen.prepared.check_tokenizer``)."""
    vocab = sorted(tokenizer.get_vocab().items())
    payload = json.dumps({"class": type(tokenizer).__name__, "vocab": vocab}, ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()
