"""Token-role tagging: turn records into token rows whose every token has a role (design §1).

A row is built from *segments* (text or token ids, each with one role) tokenised one by one and
concatenated. Inference builds its context the same way — the prompt, then generated tokens, then
each inserted ``<paragraph>…</paragraph>`` — so the model sees identical tokenisations at training
and inference time.

Multi-hop RAG query row (roles in brackets)::

    [CTX] instruction + question (the user turn; the chat template's when the tokenizer has one)
    per hop:  [GEN] lead   [RET] [RQ]   [CTX] <paragraph> title: text </paragraph>
    [GEN] answer   [GEN] EOS

``[RQ]`` is RET; in a query row it is also a CE target (the model learns *when* to retrieve); the
token after it is ``<paragraph>`` (CTX), so a RET position never predicts anything.

Entity-linking query row::

    [CTX] instruction + text
    [GEN] the text rewritten, each linked mention as  <m> surface  then [RET] [LK]  [CTX] [CON]
    [GEN] EOS

Document rows: ``[CTX] title: text`` then ``[RET] [RD]`` (``[SE]`` for entities); no GEN at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

from data_prep.records import NIL_ID, Document, LinkingExample, MultiHopExample
from onegen.config import FieldError
from onegen.roles import CTX, GEN, RET, ret_positions
from onegen.tokens import SpecialTokens


@dataclass
class RagTemplate:
    instruction: str = field(
        default="Answer the question. Retrieve a paragraph whenever you need one.",
        metadata={"help": "instruction before the question (CTX)"},
    )
    question: str = field(default="Question: {question}", metadata={"help": "question line (CTX)"})
    lead: str = field(default=" Search:", metadata={"help": "text the model writes before each [RQ] when a hop has no lead of its own (GEN)"})
    hop_lead: str = field(default=" Search: {lead}", metadata={"help": "lead when the reader gives one (e.g. 2Wiki evidence)"})
    paragraph: str = field(default="{title}: {text}", metadata={"help": "an inserted document, inside <paragraph>…</paragraph> (CTX)"})
    answer: str = field(default=" Answer: {answer}", metadata={"help": "the final answer (GEN); evaluation reads the answer after 'Answer:'"})
    document: str = field(default="{title}: {text}", metadata={"help": "a document row, followed by [RD] (CTX)"})


@dataclass
class LinkTemplate:
    instruction: str = field(
        default="Mark every entity mention in the text and link it.",
        metadata={"help": "instruction before the text (CTX)"},
    )
    text: str = field(default="Text: {text}", metadata={"help": "the input text (CTX)"})
    output_prefix: str = field(default="Marked:", metadata={"help": "start of the model's rewritten text (CTX)"})
    entity: str = field(default="{title}: {text}", metadata={"help": "an entity row, followed by [SE] (CTX)"})


@dataclass
class TaggingConfig:
    max_length: int = field(default=512, metadata={"help": "max tokens of a query row; longer rows are shortened from their inserted paragraphs (counted in the manifest's 'truncated')"})
    max_doc_length: int | Literal["auto"] = field(default="auto", metadata={"help": (
        "max tokens of a document row (text cut, the RET token kept; each cut listed in truncated.jsonl); auto = the "
        "max_doc_length_percentile of this pool's document row lengths, capped at max_doc_length_cap, computed over "
        "the whole pool before any shard (data_prep/doclength.py; the manifest's config holds the resolved number)")})
    max_doc_length_cap: int = field(default=512, metadata={"help": "upper bound of max_doc_length=auto"})
    max_doc_length_percentile: float = field(default=99.0, metadata={"help": "max_doc_length=auto: this percentile (nearest rank) of the document row lengths"})
    use_chat_template: bool = field(default=True, metadata={"help": "wrap the instruction as the user turn when the tokenizer has a chat template"})
    rag: RagTemplate = field(default_factory=RagTemplate)
    link: LinkTemplate = field(default_factory=LinkTemplate)

    def __post_init__(self) -> None:
        if self.max_doc_length != "auto" and self.max_doc_length < 2:
            raise FieldError("tagging.max_doc_length", f"must be >= 2 (a token and RET) or auto, got {self.max_doc_length}")
        if self.max_doc_length_cap < 2:
            raise FieldError("tagging.max_doc_length_cap", f"must be >= 2, got {self.max_doc_length_cap}")
        if not 0 < self.max_doc_length_percentile <= 100:
            raise FieldError("tagging.max_doc_length_percentile", f"must be in (0, 100], got {self.max_doc_length_percentile}")


class TooLong(Exception):
    """A row cannot fit ``max_length`` even after shortening its context."""


@dataclass
class Row:
    input_ids: list[int]
    roles: list[int]
    prompt_len: int


class Tagger:
    """Builds document and query rows for one tokenizer and one set of special tokens."""

    def __init__(self, tokenizer: Any, tokens: SpecialTokens, token_ids: dict[str, int], cfg: TaggingConfig):
        self.tok = tokenizer
        self.tokens = tokens
        self.ids = token_ids
        # max_doc_length=auto is resolved from the pool by prepare (data_prep/doclength.py); a tagger
        # built from an unresolved config (e.g. default templates at inference) uses the cap.
        self.cfg = cfg if cfg.max_doc_length != "auto" else replace(cfg, max_doc_length=cfg.max_doc_length_cap)
        self.eos = tokenizer.eos_token_id
        if self.eos is None:
            raise ValueError("the tokenizer has no EOS token: training targets must end with EOS")
        self.bos = [tokenizer.bos_token_id] if _adds_bos(tokenizer) else []
        self.chat = bool(cfg.use_chat_template and getattr(tokenizer, "chat_template", None))
        # How many rows / documents were shortened to fit max_length / max_doc_length: prepare reads
        # these before and after each shard and reports the totals (manifest "truncated").
        self.cut_rows = 0
        self.cut_docs = 0
        # One entry per cut row / document (what was cut, from how many tokens to how many), for
        # OUT/truncated.jsonl (data_prep.truncation); prepare takes each shard's entries off the end.
        self.cut_log: list[dict] = []

    # ---- helpers -------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"]) if text else []

    def _prompt(self, user_text: str, assistant_prefix: str = "") -> list[int]:
        """CTX prefix: BOS + user turn (through the chat template when there is one)."""
        if self.chat:
            rendered = self.tok.apply_chat_template(
                [{"role": "user", "content": user_text}], tokenize=False, add_generation_prompt=True
            )
            return self.encode(rendered + assistant_prefix)
        return self.bos + self.encode(user_text + "\n" + assistant_prefix)

    def tid(self, key: str) -> int:
        return self.ids[getattr(self.tokens, key)]

    # ---- documents -----------------------------------------------------------------------
    def _document_text(self, doc: Document, entity: bool) -> str:
        template = self.cfg.link.entity if entity else self.cfg.rag.document
        return template.format(title=doc.title, text=doc.text).strip()

    def document_row(self, doc: Document, *, entity: bool = False) -> Row:
        ret = self.tid("se" if entity else "rd")
        body = self.bos + self.encode(self._document_text(doc, entity))
        limit = self.cfg.max_doc_length
        if len(body) > limit - 1:
            self.cut_docs += 1
            self.cut_log.append({"doc_id": doc.doc_id, "tokens": len(body) + 1, "kept": limit,
                                 "reason": f"document longer than tagging.max_doc_length {limit}: end of its text cut"})
            body = body[: limit - 1]
        ids = body + [ret]
        return Row(ids, [CTX] * len(body) + [RET], prompt_len=len(ids))

    def document_lengths(self, docs: list[Document], *, entity: bool = False, batch: int = 1024) -> list[int]:
        """The uncut token length of each document's row (what ``document_row`` builds before cutting)."""
        out: list[int] = []
        for s in range(0, len(docs), batch):
            texts = [self._document_text(d, entity) for d in docs[s:s + batch]]
            ids = self.tok(texts, add_special_tokens=False)["input_ids"] if texts else []
            out += [len(self.bos) + len(x) + 1 if t else len(self.bos) + 1 for t, x in zip(texts, ids)]
        return out

    # ---- multi-hop RAG -------------------------------------------------------------------
    def rag_prompt(self, question: str) -> list[int]:
        t = self.cfg.rag
        return self._prompt(t.instruction + "\n" + t.question.format(question=question))

    def paragraph_ids(self, doc: Document, budget: int | None = None) -> list[int]:
        """``<paragraph> title: text </paragraph>`` (what inference inserts), text cut to ``budget``."""
        body = self.encode(self.cfg.rag.paragraph.format(title=doc.title, text=doc.text))
        if budget is not None:
            body = body[: max(budget, 0)]
        return [self.tid("para_open")] + body + [self.tid("para_close")]

    def rag_row(self, ex: MultiHopExample, docs: dict[str, Document]) -> Row:
        t = self.cfg.rag
        prompt = self.rag_prompt(ex.question)
        leads = []
        for i in range(len(ex.hops)):
            lead = ex.hop_leads[i] if ex.hop_leads and i < len(ex.hop_leads) else None
            leads.append(self.encode(t.hop_lead.format(lead=lead) if lead else t.lead))
        answer = self.encode(t.answer.format(answer=ex.answer)) + [self.eos]
        bodies = [self.encode(t.paragraph.format(title=docs[h].title, text=docs[h].text)) for h in ex.hops]

        fixed = len(prompt) + sum(len(l) + 3 for l in leads) + len(answer)  # +3: [RQ] <paragraph> </paragraph>
        budget = self.cfg.max_length - fixed
        if budget < len(bodies):  # not even one token per paragraph: nothing left to shorten
            raise TooLong(
                f"needs {fixed + sum(map(len, bodies))} tokens; without its paragraphs still {fixed} > max_length {self.cfg.max_length}"
            )
        if sum(map(len, bodies)) > budget:
            self.cut_rows += 1
            full = fixed + sum(map(len, bodies))
            bodies = _shorten_longest_first(bodies, budget)
            self.cut_log.append({"example_id": ex.example_id, "tokens": full, "kept": fixed + sum(map(len, bodies)),
                                 "reason": f"row longer than tagging.max_length {self.cfg.max_length}: "
                                           f"inserted paragraphs shortened"})

        ids, roles = list(prompt), [CTX] * len(prompt)
        for lead, body in zip(leads, bodies):
            seg = [(lead, GEN), ([self.tid("rq")], RET), ([self.tid("para_open")] + body + [self.tid("para_close")], CTX)]
            for part, role in seg:
                ids += part
                roles += [role] * len(part)
        ids += answer
        roles += [GEN] * len(answer)
        return Row(ids, roles, prompt_len=len(prompt))

    # ---- entity linking ------------------------------------------------------------------
    def link_prompt(self, text: str) -> list[int]:
        t = self.cfg.link
        return self._prompt(t.instruction + "\n" + t.text.format(text=text), assistant_prefix=t.output_prefix)

    def link_row(self, ex: LinkingExample) -> tuple[Row, list[str]]:
        """The EL row and the entity id of each ``[LK]`` (NIL mentions are left unmarked)."""
        prompt = self.link_prompt(ex.text)
        ids, roles = list(prompt), [CTX] * len(prompt)
        positives: list[str] = []
        cursor = 0
        for m in ex.mentions:
            if m.entity_id == NIL_ID or m.start < cursor:  # NIL: not linked; overlap: keep the first
                continue
            # Exact slices of the text (its own spaces), so the output maps back to character offsets.
            plain = self.encode((" " if cursor == 0 else "") + ex.text[cursor:m.start])
            seg = [(plain, GEN), ([self.tid("mention_open")], GEN),
                   (self.encode(ex.text[m.start:m.end]), GEN), ([self.tid("lk")], RET), ([self.tid("con")], CTX)]
            for part, role in seg:
                ids += part
                roles += [role] * len(part)
            positives.append(m.entity_id)
            cursor = m.end
        rest = self.encode((" " if cursor == 0 else "") + ex.text[cursor:].rstrip()) + [self.eos]
        ids += rest
        roles += [GEN] * len(rest)
        if len(ids) > self.cfg.max_length:
            raise TooLong(f"needs {len(ids)} tokens > max_length {self.cfg.max_length}; split the text into shorter passages")
        return Row(ids, roles, prompt_len=len(prompt)), positives


def _shorten_longest_first(bodies: list[list[int]], budget: int) -> list[list[int]]:
    """Cut the longest paragraphs first until the total fits ``budget`` (context only, never RET/answer)."""
    lengths = [len(b) for b in bodies]
    while sum(lengths) > budget:
        i = max(range(len(lengths)), key=lambda j: lengths[j])
        excess = sum(lengths) - budget
        second = sorted(lengths)[-2] if len(lengths) > 1 else 0
        lengths[i] -= max(1, min(excess, lengths[i] - second))
    return [b[:n] for b, n in zip(bodies, lengths)]


def _adds_bos(tokenizer: Any) -> bool:
    if tokenizer.bos_token_id is None:
        return False
    probe = tokenizer("a")["input_ids"]
    return bool(probe) and probe[0] == tokenizer.bos_token_id


def split_long_text(ex: LinkingExample, max_chars: int) -> list[LinkingExample]:
    """Split an EL document into passages of at most ``max_chars`` at sentence ends, never inside a mention.

    Offsets of the mentions are re-based on each passage; passage ids are ``{id}#p{k}``.
    """
    if len(ex.text) <= max_chars:
        return [ex]
    cuts, start = [], 0
    spans = [(m.start, m.end) for m in ex.mentions]
    while len(ex.text) - start > max_chars:
        end = start + max_chars
        stop = max((ex.text.rfind(p, start, end) for p in (". ", "\n", "? ", "! ")), default=-1)
        cut = stop + 1 if stop > start else end
        while any(s < cut < e for s, e in spans):
            cut -= 1
        if cut <= start:
            cut = end
        cuts.append((start, cut))
        start = cut
    cuts.append((start, len(ex.text)))
    out = []
    for k, (s, e) in enumerate(cuts):
        mentions = [type(m)(m.start - s, m.end - s, m.entity_id, m.surface, m.raw_entity_id)
                    for m in ex.mentions if s <= m.start and m.end <= e]
        out.append(LinkingExample(f"{ex.example_id}#p{k}", ex.text[s:e], mentions, ex.source, ex.line))
    return out


def row_ret_positions(row: Row) -> list[int]:
    return ret_positions(row.roles).tolist()
