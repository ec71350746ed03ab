"""One-pass RAG inference: greedy decoding through a KV cache, retrieving whenever ``[RQ]`` appears.

Per question (a prepared ``queries/`` row)::

    prefill   input_ids[:prompt_len]                         (the CTX prompt, as in training)
    decode    one token per forward, greedy, cache reused     (the prefix is never re-run)
    [RQ]      fed like any generated token; its forward's last-layer state IS the query
              -> retriever.retrieve(...) -> top-1 doc
    prefill   <paragraph> title: text </paragraph>            (Tagger.paragraph_ids, ONE forward)
    ...       until EOS, max_new_tokens, or the context is full; after max_hops retrievals
              [RQ] is masked out of the logits

Forward accounting (exact, asserted by the tests): one prefill for the prompt, one decode forward
per generated token except the last (whose successor is never needed), one prefill per inserted
paragraph. The ``[RQ]`` forward's logits are unused: the next tokens are the paragraph, whose
prefill gives the logits of the token after ``</paragraph>``.

Token masks while decoding (``mask_context_tokens``): the tokens that only ever appear as context
in RAG rows (``[RD]``, ``<paragraph>``, ``</paragraph>``, the entity-linking tokens, pad) are never
generated. ``[RQ]`` is masked once ``max_hops`` retrievals happened, when no token could follow the
paragraph within ``max_new_tokens``, and always in forced mode (``force_retrieval_every``), where
the loop itself inserts ``[RQ]`` after every N generated tokens — the efficiency benchmark's fixed
schedule; ``force_new_tokens`` masks EOS until exactly that many tokens (``[RQ]`` included) are
generated, then stops.

Dialogue (``run_dialogue``): several questions in ONE context. Round i+1 starts after round i's
last token; a round that stopped without EOS is closed with one, then the next row's prompt
``input_ids[:prompt_len]`` (leading BOS dropped) is appended as CTX and prefilled together with
that pending token — so each round sees exactly the prompt it would see alone, preceded by the
previous rounds (their answers and inserted paragraphs included). Each round is one result.

Batched decoding (``GenerationConfig.batch_size`` > 1, ``run_questions`` only): the loop above is a
generator that yields each forward it needs; ``answer_rows`` runs several through one
:class:`evaluation.kv.BatchedKV`, one forward per step for the whole group, and gives the batch-1
tokens (tested; equal states up to float summation order). A paragraph prefill widens the forward
for every row, so prefills wait while most of the group is decoding and then go together
(``evaluation.kv.drive_batched``). Batch 1 stays the default: it is what the latency comparison of
the paper (Figure 3) measures, and ``s_per_question`` of a batched run is a throughput.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from evaluation.index import Hits
from evaluation.kv import BatchedKV, Context, ContextFull, KVSession, Steps, drive, drive_batched
from evaluation.retrievers import RetrievalStep, Retriever
from evaluation.runtime import Runtime, row_groups
from onegen.errors import ConfigError


@dataclass
class GenerationConfig:
    max_new_tokens: int = field(default=64, metadata={"help": "most tokens the model generates per question ([RQ] included; inserted paragraphs not)"})
    max_hops: int = field(default=4, metadata={"help": "most retrievals per question; then [RQ] is masked out"})
    k: int = field(default=5, metadata={"help": "documents retrieved per [RQ] (the top-1 is inserted; the rest count for recall@k)"})
    setting: Literal["distractor", "open"] = field(default="distractor", metadata={"help": "distractor: rank the question's own paragraphs (candidates); open: the whole index"})
    force_retrieval_every: int | None = field(default=None, metadata={"help": "force [RQ] after every N generated tokens instead of using the logits (efficiency benchmark)"})
    force_new_tokens: int | None = field(default=None, metadata={"help": "generate exactly this many tokens per question/round, [RQ] included (EOS masked until then; overrides max_new_tokens)"})
    paragraph_budget: int | None = field(default=None, metadata={"help": "max body tokens of an inserted paragraph; None = the data's max_doc_length"})
    max_context: int | None = field(default=None, metadata={"help": "max context tokens; None = the model's max_position_embeddings"})
    mask_context_tokens: bool = field(default=True, metadata={"help": "never generate tokens that are context-only in RAG rows ([RD], <paragraph>, EL tokens, pad)"})
    batch_size: int = field(default=1, metadata={"help": "questions decoded together through one batched KV cache (run_questions; same tokens as 1, up to float ties)"})

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "k", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"GenerationConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_hops < 0:
            raise ConfigError(f"GenerationConfig.max_hops must be >= 0, got {self.max_hops}")
        for name in ("force_retrieval_every", "force_new_tokens", "paragraph_budget", "max_context"):
            v = getattr(self, name)
            if v is not None and v < (0 if name == "paragraph_budget" else 1):
                raise ConfigError(f"GenerationConfig.{name} must be positive, got {v}")
        if self.setting not in ("distractor", "open"):
            raise ConfigError(f"GenerationConfig.setting must be 'distractor' or 'open', got {self.setting!r}")


@dataclass
class Hop:
    """One retrieval: what was found, where ``[RQ]`` sat in the context, and the query vector."""

    retrieved: Hits
    position: int  # index of [RQ] in the context
    inserted: str | None  # doc id inserted as <paragraph> (None: empty paragraph)
    query: np.ndarray | None = field(default=None, repr=False)  # normalised [RQ] state; not serialised


@dataclass
class QuestionResult:
    """One question (or one dialogue round): the output, what was retrieved, the gold, the costs."""

    example_id: str
    question: str
    output_text: str  # everything after the prompt, special tokens and inserted paragraphs included
    answer: str  # text after the template's last "Answer:" marker, stripped ("" when absent): ``final_answer``
    answer_found: bool  # a non-empty final answer parsed AND the generation ended with EOS (``answer_of``)
    hops: list[Hop]
    gold_answers: list[str]
    gold_hops: list[str]
    setting: str
    retriever: str
    stop_reason: str  # eos | max_new_tokens | forced_length | context_full
    n_generated: int
    prompt_tokens: int
    context_tokens: int  # length of the whole context at the end of this question/round
    decode_steps: int  # single-token forwards of the generator
    prefills: int  # multi-token forwards (prompt, inserted paragraphs)
    retriever_forwards: int  # forwards the retriever made of its own
    wall_s: float
    round: int = 0
    output_ids: list[int] = field(default_factory=list, repr=False)

    def retrieved_ids(self) -> list[list[str]]:
        """Ranked doc ids per hop (what recall@k and hop recall take)."""
        return [[d for d, _ in h.retrieved] for h in self.hops]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hops"] = [{"retrieved": [[i, s] for i, s in h.retrieved], "position": h.position, "inserted": h.inserted}
                     for h in self.hops]
        d.pop("output_ids")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuestionResult":
        """The result ``to_dict`` wrote (a shard's, for the merge): what scoring reads, exactly."""
        hops = [Hop([(str(i), float(s)) for i, s in h["retrieved"]], int(h["position"]), h["inserted"])
                for h in d["hops"]]
        return cls(**{**d, "hops": hops})


def answer_marker(rt: Runtime) -> str:
    """The text before ``{answer}`` in the answer template ("Answer:")."""
    return rt.tagger.cfg.rag.answer.split("{answer}")[0].strip() or "Answer:"


def final_answer(text: str, marker: str = "Answer:") -> str | None:
    """The final answer of a generation's own text: what follows the last ``marker``, stripped; None
    when the marker is absent or nothing follows it. The one parser of answers (``answer_of``)."""
    i = text.rfind(marker)
    if i < 0:
        return None
    return text[i + len(marker):].strip() or None


def answer_of(text: str, marker: str, stop_reason: str) -> tuple[str, bool]:
    """``(answer, answer_found)`` of a generation: the answer scored ("" when none was parsed), and
    whether the model *finished* with one — a non-empty final answer parsed AND the generation ended
    with EOS. A generation cut at the token limit (e.g. looping "Search: ... Answer: ..." until
    ``max_new_tokens``) is not an answer found, whatever its text holds."""
    parsed = final_answer(text, marker)
    return parsed or "", parsed is not None and stop_reason == "eos"


def _banned(rt: Runtime, keys: Sequence[str]) -> torch.Tensor:
    ids = sorted({rt.ids[k] for k in keys})
    pad = rt.tokenizer.pad_token_id
    if pad is not None and pad != rt.eos_id:
        ids.append(int(pad))
    return torch.tensor(ids, dtype=torch.long)


RAG_CONTEXT_ONLY = ("rd", "para_open", "para_close", "lk", "se", "con", "mention_open")


class _Decoder:
    """The RAG decoding loop over one context (one question, or the rounds of a dialogue).

    ``steps`` is the loop as a generator that yields each forward it needs; ``round`` runs it
    alone through a :class:`KVSession`, ``run_questions`` runs several through one
    :class:`BatchedKV`.
    """

    def __init__(self, rt: Runtime, retriever: Retriever, cfg: GenerationConfig, session: Context | None = None) -> None:
        if rt.docs is None:
            raise ConfigError("the runtime has no documents to insert: load it with the prepared dataset "
                              "(load_runtime(model_dir, open_prepared(...)))")
        self.rt, self.retriever, self.cfg = rt, retriever, cfg
        self.rq, self.eos = rt.ids["rq"], rt.eos_id
        self.banned = _banned(rt, RAG_CONTEXT_ONLY) if cfg.mask_context_tokens else torch.zeros(0, dtype=torch.long)
        self.marker = answer_marker(rt)
        self.budget = cfg.paragraph_budget if cfg.paragraph_budget is not None else rt.tagger.cfg.max_doc_length
        self.session = session if session is not None else KVSession(rt, cfg.max_context)
        self.banned = self.banned.to(rt.device)

    def _paragraph(self, hits: Hits) -> tuple[list[int], str | None]:
        open_, close = self.rt.ids["para_open"], self.rt.ids["para_close"]
        if not hits:
            return [open_, close], None
        budget = min(self.budget, self.session.room() - 3)  # leave room for the token after </paragraph>
        doc = self.rt.docs.get(hits[0][0])  # type: ignore[union-attr]
        return self.rt.tagger.paragraph_ids(doc, budget=budget), doc.doc_id

    def round(self, row: dict, round_idx: int = 0) -> QuestionResult:
        assert isinstance(self.session, KVSession)
        return drive(self.steps(row, round_idx), self.session)

    def _prompt(self, row: dict, round_idx: int) -> list[int]:
        """The row's prompt; in a dialogue's later rounds without its BOS, after an EOS closing the last round."""
        prompt = list(row["input_ids"][: int(row["prompt_len"])])
        if round_idx > 0:
            bos = self.rt.tokenizer.bos_token_id
            if prompt and self.rt.tagger.bos and prompt[0] == bos:
                prompt = prompt[1:]
            if self.session.context and self.session.context[-1] != self.eos:
                prompt = [self.eos] + prompt  # close the previous round's answer
        return prompt

    def steps(self, row: dict, round_idx: int = 0) -> Steps:
        cfg, s, tok_ = self.cfg, self.session, self.rt.tokenizer
        t0 = time.perf_counter()
        f0, retriever_forwards = Counter(s.forwards), 0
        prompt = self._prompt(row, round_idx)
        candidates = list(row["candidates"]) if cfg.setting == "distractor" and row.get("candidates") else None
        setting = "distractor" if candidates is not None else "open"
        limit = cfg.force_new_tokens or cfg.max_new_tokens
        generated: list[int] = []
        own: list[int] = []
        since = 0  # own[since:] is what the model wrote after the previous retrieval
        hops: list[Hop] = []
        since = 0
        gen_start = len(s.context) + len(prompt)
        stop = None
        try:
            s.push(prompt)
        except ContextFull:
            stop = "context_full"
        out = (yield "prefill") if stop is None else None
        while stop is None:
            if len(generated) >= limit:
                stop = "forced_length" if cfg.force_new_tokens else "max_new_tokens"
                break
            if s.room() < 1:
                stop = "context_full"
                break
            can_rq = len(hops) < cfg.max_hops and len(generated) + 1 < limit and s.room() >= 4
            tok = None
            if cfg.force_retrieval_every is not None and can_rq and since >= cfg.force_retrieval_every:
                tok = self.rq
            if tok is None:
                logits = out.logits.clone()  # type: ignore[union-attr]
                logits[self.banned] = float("-inf")
                if not can_rq or cfg.force_retrieval_every is not None:
                    logits[self.rq] = float("-inf")
                if cfg.force_new_tokens and len(generated) + 1 < cfg.force_new_tokens:
                    logits[self.eos] = float("-inf")
                tok = int(torch.argmax(logits))
            generated.append(tok)
            s.push([tok])
            if tok == self.eos:
                stop = "eos"
                break
            if tok == self.rq:
                out = yield "decode"  # the forward whose input is [RQ]: its state is the query
                h = out.hidden[-1]
                step = RetrievalStep(question=row["question"], generated_text=tok_.decode(own, skip_special_tokens=True),
                                     k=cfg.k, candidates=candidates, hidden=h, context_ids=list(s.context), hop=len(hops),
                                     latest_text=tok_.decode(own[since:], skip_special_tokens=True))
                since = len(own)
                r0 = self.retriever.forward_calls  # counted around the call: other contexts may retrieve in between
                hits = self.retriever.retrieve(step)
                retriever_forwards += self.retriever.forward_calls - r0
                para, inserted = self._paragraph(hits)
                q = F.normalize(h.detach().float(), dim=-1).cpu().numpy()
                hops.append(Hop(list(hits), len(s.context) - 1, inserted, q))
                s.push(para)
                out = yield "prefill"  # the whole paragraph in one forward through the cache
                since = 0
                continue
            own.append(tok)
            since += 1
            if len(generated) >= limit:
                continue  # stop at the loop top without feeding a token nobody needs
            out = yield "decode"
        answer, found = answer_of(tok_.decode(own, skip_special_tokens=True), self.marker, stop)
        f1 = s.forwards - f0
        return QuestionResult(
            example_id=str(row.get("example_id", "")), question=row.get("question", ""),
            output_text=tok_.decode(s.context[gen_start:], skip_special_tokens=False),
            answer=answer, answer_found=found, hops=hops,
            gold_answers=list(row.get("answers") or ([row["answer"]] if row.get("answer") else [])),
            gold_hops=list(row.get("positives") or []), setting=setting, retriever=getattr(self.retriever, "name", type(self.retriever).__name__),
            stop_reason=stop, n_generated=len(generated), prompt_tokens=len(prompt), context_tokens=len(s.context),
            decode_steps=f1.get("decode", 0), prefills=f1.get("prefill", 0),
            retriever_forwards=retriever_forwards, wall_s=time.perf_counter() - t0,
            round=round_idx, output_ids=list(s.context[gen_start:]),
        )


def answer_row(rt: Runtime, row: dict, retriever: Retriever, cfg: GenerationConfig | None = None) -> QuestionResult:
    """Answer one prepared query row in a fresh context."""
    return _Decoder(rt, retriever, cfg or GenerationConfig()).round(row)


def run_questions(rt: Runtime, retriever: Retriever, cfg: GenerationConfig | None = None,
                  indices: Sequence[int] | None = None, *, progress: bool = True) -> list[QuestionResult]:
    """Answer rows of the runtime's prepared dataset (all, or ``indices``), each in its own context.

    ``cfg.batch_size`` questions at a time share one batched forward per step (:class:`BatchedKV`);
    a group runs until its last question stops, so ``wall_s`` is then the time from the group's
    start to the question's end.
    """
    if rt.data is None:
        raise ConfigError("run_questions needs a runtime loaded with a prepared dataset")
    if rt.data.task != "rag":
        raise ConfigError(f"{rt.data.path} is a {rt.data.task!r} dataset; use evaluation.linking for entity linking")
    cfg = cfg or GenerationConfig()
    indices = list(range(len(rt.data))) if indices is None else list(indices)
    results: list[QuestionResult] = []
    bar = tqdm(total=len(indices), desc=f"generate [{getattr(retriever, 'name', '?')}]", unit="q", disable=not progress)
    for rows in row_groups(rt.data, indices, cfg.batch_size):
        done = answer_rows(rt, rows, retriever, cfg)
        results.extend(done)
        bar.update(len(done))
    bar.close()
    return results


def answer_rows(rt: Runtime, rows: Sequence[dict], retriever: Retriever, cfg: GenerationConfig) -> list[QuestionResult]:
    """Answer ``rows`` together, each in its own context, one batched forward per step."""
    if len(rows) == 1:
        return [answer_row(rt, rows[0], retriever, cfg)]
    kv = BatchedKV(rt, len(rows), cfg.max_context)
    return drive_batched(kv, [_Decoder(rt, retriever, cfg, session=kv.rows[b]).steps(row) for b, row in enumerate(rows)])


def run_dialogue(rt: Runtime, rows: Sequence[dict], retriever: Retriever,
                 cfg: GenerationConfig | None = None) -> list[QuestionResult]:
    """Several questions answered one after another in ONE context (see the module docstring)."""
    dec = _Decoder(rt, retriever, cfg or GenerationConfig())
    return [dec.round(row, i) for i, row in enumerate(rows)]


def question_row(rt: Runtime, question: str, example_id: str = "") -> dict:
    """A query row for a free-form question (prompt built by the tagger, no gold)."""
    ids = rt.tagger.rag_prompt(question)
    return {"example_id": example_id, "question": question, "input_ids": ids, "prompt_len": len(ids),
            "candidates": [], "answers": [], "positives": []}
