"""Entity-linking inference: the model rewrites the text marking mentions, and links each one itself.

Per EL row (prompt = ``input_ids[:prompt_len]``: instruction + text + "Marked:")::

    decode greedily through the KV cache
    <m> surface [LK]   -> [LK] and the forced [CON] are fed in ONE forward: the state at [LK]
                          (causal: unaffected by [CON] after it) is the query, searched in the
                          entity index ([SE] states of the KB = the EL prepared docs/); the
                          logits after [CON] give the next token
    ... EOS            -> markers stripped, mentions aligned to the original text
                          (``evaluation.align``) -> predictions (start, end, entity_id)

Light grammar constraints keep the output parseable (``constrain``): ``<m>`` only outside a
mention, ``[LK]`` only inside one with at least one surface token, the RAG tokens and ``[CON]``
never generated (``[CON]`` is always forced).

Batched (``LinkConfig.batch_size`` > 1, ``run_linking``): ``link_steps`` is the loop as a generator
of forward requests, run together through one ``evaluation.kv.BatchedKV`` with the batch-1 tokens.

``replay``: instead of decoding, feed a given output (e.g. the gold ``input_ids[prompt_len:]``),
still linking at every ``[LK]`` with the model's own state — entity linking *given the gold
mentions* (disambiguation only), whose hop-aligned Recall@1 is the free-running counterpart of the
teacher-forced number.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from evaluation.align import align_mentions, parse_marked
from evaluation.index import DocIndex, Hits
from evaluation.kv import BatchedKV, Context, KVSession, Steps, drive, drive_batched
from evaluation.metrics import NIL_ID, aggregate, el_scores, hop_recall_at_1
from evaluation.runtime import Runtime, row_groups
from onegen.errors import ConfigError

EL_NEVER_GENERATED = ("rq", "rd", "para_open", "para_close", "se", "con")


@dataclass
class LinkConfig:
    max_new_tokens: int | None = field(default=None, metadata={"help": "most generated tokens; None = 2 x the text's tokens + 16"})
    k: int = field(default=5, metadata={"help": "entities retrieved per [LK] (top-1 is the prediction)"})
    max_links: int = field(default=64, metadata={"help": "most mentions per text; then <m> and [LK] are masked"})
    nil_threshold: float | None = field(default=None, metadata={"help": "predict NIL when the top-1 score is below this (None: never)"})
    constrain: bool = field(default=True, metadata={"help": "grammar masks: <m> only outside a mention, [LK] only inside a non-empty one"})
    max_context: int | None = field(default=None, metadata={"help": "max context tokens; None = the model's max_position_embeddings"})
    batch_size: int = field(default=1, metadata={"help": "texts decoded together through one batched KV cache (run_linking; same tokens as 1)"})

    def __post_init__(self) -> None:
        if self.k < 1 or self.max_links < 0 or self.batch_size < 1 or (self.max_new_tokens is not None and self.max_new_tokens < 1):
            raise ConfigError(f"LinkConfig: k >= 1, max_links >= 0, batch_size >= 1 and max_new_tokens >= 1 are required, got {self}")


@dataclass
class Link:
    retrieved: Hits
    position: int  # index of [LK] in the context
    span: tuple[int, int] | None = None  # character span in the original text (None: unaligned/stray)
    query: np.ndarray | None = field(default=None, repr=False)


@dataclass
class LinkResult:
    example_id: str
    text: str
    output_text: str
    predictions: list[tuple[int, int, str]]
    gold: list[tuple[int, int, str]]
    gold_links: list[str]  # the entity of each gold [LK], in order (the row's positives)
    links: list[Link]
    unaligned: int  # marked mentions that could not be placed in the original text
    stop_reason: str
    n_generated: int
    decode_steps: int
    prefills: int
    link_forwards: int  # [LK]+[CON] forwards (one per link)
    wall_s: float
    output_ids: list[int] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["links"] = [{"retrieved": [[i, s] for i, s in l.retrieved], "position": l.position, "span": l.span}
                      for l in self.links]
        d.pop("output_ids")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LinkResult":
        """The result ``to_dict`` wrote (a shard's, for the merge): what scoring reads, exactly."""
        links = [Link([(str(i), float(s)) for i, s in l["retrieved"]], int(l["position"]),
                      tuple(l["span"]) if l["span"] is not None else None) for l in d["links"]]
        spans = lambda xs: [(int(a), int(b), str(e)) for a, b, e in xs]  # noqa: E731 (JSON lists -> tuples)
        return cls(**{**d, "links": links, "predictions": spans(d["predictions"]), "gold": spans(d["gold"])})


def _banned(rt: Runtime) -> torch.Tensor:
    ids = sorted({rt.ids[k] for k in EL_NEVER_GENERATED})
    pad = rt.tokenizer.pad_token_id
    if pad is not None and pad != rt.eos_id:
        ids.append(int(pad))
    return torch.tensor(ids, dtype=torch.long, device=rt.device)


def link_row(rt: Runtime, row: dict, index: DocIndex, cfg: LinkConfig | None = None, *,
             replay: Sequence[int] | None = None) -> LinkResult:
    """Link one prepared EL row (free decoding, or ``replay`` of a given output)."""
    cfg = cfg or LinkConfig()
    s = KVSession(rt, cfg.max_context)
    return drive(link_steps(rt, row, index, cfg, s, replay=replay), s)


def link_rows(rt: Runtime, rows: Sequence[dict], index: DocIndex, cfg: LinkConfig,
              replays: Sequence[Sequence[int] | None] | None = None) -> list[LinkResult]:
    """Link ``rows`` together, each in its own context, one batched forward per step."""
    replays = replays or [None] * len(rows)
    if len(rows) == 1:
        return [link_row(rt, rows[0], index, cfg, replay=replays[0])]
    kv = BatchedKV(rt, len(rows), cfg.max_context)
    return drive_batched(kv, [link_steps(rt, row, index, cfg, kv.rows[b], replay=replays[b]) for b, row in enumerate(rows)])


def link_steps(rt: Runtime, row: dict, index: DocIndex, cfg: LinkConfig, s: Context, *,
               replay: Sequence[int] | None = None) -> Steps:
    """The linking loop over the context ``s``, yielding each forward it needs; returns the result."""
    t0 = time.perf_counter()
    ids = rt.ids
    m_open, lk, con, eos = ids["mention_open"], ids["lk"], ids["con"], rt.eos_id
    banned = _banned(rt)
    text = row["question"]
    limit = cfg.max_new_tokens or 2 * len(rt.tagger.encode(" " + text)) + 16
    if replay is not None:
        seq = [int(t) for t in replay]
        replay = [t for i, t in enumerate(seq) if not (t == con and i > 0 and seq[i - 1] == lk)]
        limit = max(limit, len(replay))
    s.push(list(row["input_ids"][: int(row["prompt_len"])]))
    out = yield "prefill"
    gen_start = len(s.context)
    generated: list[int] = []
    links: list[Link] = []
    in_mention, mention_len, stop = False, 0, None
    while stop is None:
        if len(generated) >= limit:
            stop = "max_new_tokens"
            break
        if s.room() < 2:
            stop = "context_full"
            break
        if replay is not None:
            if len(generated) >= len(replay):
                stop = "replay_end"
                break
            tok = replay[len(generated)]
        else:
            tok = _next_token(out.logits, banned, cfg, len(links), in_mention, mention_len, m_open, lk)
        generated.append(tok)
        if tok == eos:
            s.push([tok])
            stop = "eos"
            break
        if tok == lk:
            s.push([lk, con])
            out = yield "link"  # [LK] and the forced [CON] together: state at [LK] = hidden[-2]
            q = F.normalize(out.hidden[-2].float(), dim=-1).cpu().numpy()
            hits = index.search(q[None], cfg.k)[0]
            links.append(Link(hits, len(s.context) - 2, None, q))
            in_mention = False
            continue
        if tok == m_open:
            in_mention, mention_len = True, 0
        elif in_mention:
            mention_len += 1
        s.push([tok])
        if len(generated) >= limit:
            continue
        out = yield "decode"

    predictions, unaligned = _place_links(rt, generated, text, links, cfg)
    counts = s.forwards
    return LinkResult(
        example_id=str(row.get("example_id", "")), text=text,
        output_text=rt.tokenizer.decode(s.context[gen_start:], skip_special_tokens=False),
        predictions=predictions, gold=[(int(m["start"]), int(m["end"]), str(m["entity_id"])) for m in row.get("mentions") or []],
        gold_links=list(row.get("positives") or []), links=links, unaligned=unaligned, stop_reason=stop,
        n_generated=len(generated), decode_steps=counts.get("decode", 0), prefills=counts.get("prefill", 0),
        link_forwards=counts.get("link", 0), wall_s=time.perf_counter() - t0, output_ids=list(s.context[gen_start:]),
    )


def _next_token(logits: torch.Tensor, banned: torch.Tensor, cfg: LinkConfig, n_links: int, in_mention: bool,
                mention_len: int, m_open: int, lk: int) -> int:
    """Greedy next token under the masks: never the banned tokens; no <m>/[LK] past ``max_links``; the grammar."""
    logits = logits.clone()
    logits[banned] = float("-inf")
    if n_links >= cfg.max_links:
        logits[m_open] = logits[lk] = float("-inf")
    if cfg.constrain:
        if in_mention:
            logits[m_open] = float("-inf")
        if not in_mention or mention_len == 0:
            logits[lk] = float("-inf")
    return int(torch.argmax(logits))


def _place_links(rt: Runtime, generated: list[int], text: str, links: list[Link],
                 cfg: LinkConfig) -> tuple[list[tuple[int, int, str]], int]:
    """Align the output's marked mentions to ``text`` (setting each link's span); returns the predictions
    (span + top-1 entity, NIL under ``nil_threshold``) and how many mentions could not be placed."""
    ids = rt.ids
    marked = parse_marked(generated, rt.tokenizer, mention_open=ids["mention_open"], lk=ids["lk"], con=ids["con"],
                          eos=rt.eos_id)
    spans = align_mentions(marked, text)
    predictions: list[tuple[int, int, str]] = []
    unaligned = 0
    for m, span in zip(marked.mentions, spans):
        if span is None or m.link >= len(links):
            unaligned += 1
            continue
        link = links[m.link]
        link.span = span
        top = link.retrieved[0] if link.retrieved else None
        entity = NIL_ID if top is None or (cfg.nil_threshold is not None and top[1] < cfg.nil_threshold) else top[0]
        predictions.append((span[0], span[1], entity))
    return predictions, unaligned


def run_linking(rt: Runtime, index: DocIndex, cfg: LinkConfig | None = None, indices: Sequence[int] | None = None, *,
                gold_mentions: bool = False, progress: bool = True) -> list[LinkResult]:
    """Link rows of the runtime's EL dataset; ``gold_mentions`` replays each row's gold output."""
    if rt.data is None or rt.data.task != "el":
        raise ConfigError("run_linking needs a runtime loaded with an entity-linking prepared dataset (task 'el')")
    indices = list(range(len(rt.data))) if indices is None else list(indices)
    cfg = cfg or LinkConfig()
    results: list[LinkResult] = []
    bar = tqdm(total=len(indices), desc="link", unit="text", disable=not progress)
    for rows in row_groups(rt.data, indices, cfg.batch_size):
        replays = [list(r["input_ids"][int(r["prompt_len"]):]) if gold_mentions else None for r in rows]
        done = link_rows(rt, rows, index, cfg, replays)
        results.extend(done)
        bar.update(len(done))
    bar.close()
    return results


def summarize_linking(results: Sequence[LinkResult]) -> dict[str, Any]:
    """GERBIL strong-match P/R/F1 and mention detection (``metrics.el_scores``), link Recall@1, costs."""
    out: dict[str, Any] = el_scores([r.predictions for r in results], [r.gold for r in results])
    records = []
    for r in results:
        rec: dict[str, Any] = {"wall_s": r.wall_s, "n_links": len(r.links), "unaligned": r.unaligned}
        if r.gold_links:
            rec["hop_recall_at_1"] = hop_recall_at_1([l.retrieved[:1] for l in r.links], r.gold_links)
        records.append(rec)
    agg = aggregate(records, ["hop_recall_at_1", "wall_s", "n_links", "unaligned"])
    out["link_recall_at_1"] = agg.get("hop_recall_at_1")
    out.update({k: agg[k] for k in ("wall_s", "n_links", "unaligned") if k in agg})
    out["n"] = len(results)
    out["stop_reasons"] = dict(Counter(r.stop_reason for r in results))
    return out


# --------------------------------------------------------------------------------------------
# Linking given the gold mentions: OneGen's own [LK] states vs a name-match baseline, same KB
# --------------------------------------------------------------------------------------------


def gold_link_accuracy(results: Sequence[LinkResult]) -> dict[str, Any]:
    """OneGen's linking accuracy on gold mentions, from ``run_linking(..., gold_mentions=True)``: gold
    link j of a text (its ``positives[j]``) is right iff the top-1 entity of the j-th ``[LK]`` is it;
    ``acc`` = right / gold links (None without any)."""
    right = total = 0
    for r in results:
        for j, gold in enumerate(r.gold_links):
            top = r.links[j].retrieved[:1] if j < len(r.links) else []
            total += 1
            right += int(bool(top) and top[0][0] == gold)
    return {"acc": right / total if total else None, "right": right, "n": total}


def name_key(s: str) -> str:
    """How the name-match baseline compares names: lower-cased, whitespace collapsed."""
    return " ".join(s.lower().split())


def linked_gold_mentions(mentions: Sequence[dict]) -> list[tuple[int, int, str]]:
    """The gold mentions that carry an ``[LK]`` in the prepared row, in order (one per ``positives``
    entry): the tagger's rule — NIL mentions are not linked, a mention overlapping the previous
    linked one is dropped."""
    out: list[tuple[int, int, str]] = []
    cursor = 0
    for m in mentions:
        start, end, entity = int(m["start"]), int(m["end"]), str(m["entity_id"])
        if entity == NIL_ID or start < cursor:
            continue
        out.append((start, end, entity))
        cursor = end
    return out


def name_match_links(data: Any, kb_ids: Sequence[str], indices: Sequence[int]) -> tuple[list[list[dict]], int]:
    """The name-match baseline, mention by mention: for each row of ``indices``, each linked gold mention as
    ``{"span", "mention", "gold", "name_match"}`` (None: no KB name equals the mention), and how many
    mentions matched several names. The rule: the entity whose name (its document title) equals the
    mention's surface text after ``name_key``; several -> the first by doc id (string order)."""
    titles = dict(zip(data.docs["doc_id"][:], data.docs["title"][:]))  # lists: a lazy column iterates slowly
    by_name: dict[str, list[str]] = {}
    for d in kb_ids:
        key = name_key(titles.get(d) or "")
        if key:  # an entity without a name matches nothing
            by_name.setdefault(key, []).append(d)
    rows: list[list[dict]] = []
    ambiguous = 0
    cols = data.queries.select_columns(["question", "mentions"])
    indices = list(indices)
    for s in range(0, len(indices), 512):
        part = cols[indices[s:s + 512]]
        for text, mentions in zip(part["question"], part["mentions"]):
            row = []
            for start, end, entity in linked_gold_mentions(mentions or []):
                names = by_name.get(name_key(text[start:end])) or []
                ambiguous += int(len(names) > 1)
                row.append({"span": [start, end], "mention": text[start:end], "gold": entity,
                            "name_match": min(names) if names else None})
            rows.append(row)
    return rows, ambiguous


def name_match_baseline(data: Any, kb_ids: Sequence[str], indices: Sequence[int]) -> dict[str, Any]:
    """Link each gold mention of the rows ``indices`` by name alone, over the KB ``kb_ids`` (the
    entity index's documents; rule: ``name_match_links``). ``acc`` = right / gold links; ``no_name``:
    mentions no KB name equals (wrong); ``ambiguous``: mentions several names equal."""
    return name_match_scores(*name_match_links(data, kb_ids, indices), kb_size=len(kb_ids))


def name_match_scores(rows: Sequence[Sequence[dict]], ambiguous: int, kb_size: int) -> dict[str, Any]:
    """``name_match_baseline``'s scores from what ``name_match_links`` returned."""
    links = [m for row in rows for m in row]
    right = sum(m["name_match"] == m["gold"] for m in links)
    total = len(links)
    return {"acc": right / total if total else None, "right": right, "n": total, "ambiguous": ambiguous,
            "no_name": sum(m["name_match"] is None for m in links), "kb_size": kb_size}


def gold_mention_table(replayed: Sequence[LinkResult], name_rows: Sequence[Sequence[dict]]) -> list[list[dict]]:
    """Per text, each linked gold mention with OneGen's top-1 entity (its own ``[LK]`` state, gold output
    replayed) beside the name-match baseline's: where each one errs, mention by mention."""
    table = []
    for r, row in zip(replayed, name_rows):
        table.append([{**m, "onegen": (r.links[j].retrieved[0][0] if j < len(r.links) and r.links[j].retrieved else None)}
                      for j, m in enumerate(row)])
    return table


def agreement(table: Sequence[Sequence[dict]]) -> dict[str, int]:
    """How many gold mentions both link right, only OneGen, only name match, neither."""
    out = {"both": 0, "onegen_only": 0, "name_match_only": 0, "neither": 0}
    for m in (m for row in table for m in row):
        one, name = m["onegen"] == m["gold"], m["name_match"] == m["gold"]
        out["both" if one and name else "onegen_only" if one else "name_match_only" if name else "neither"] += 1
    return out
