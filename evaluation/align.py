"""Entity-linking output -> character spans of the original text.

The model rewrites the text with each linked mention marked (``Tagger.link_row``)::

    " Laves met <m>Laves[LK][CON] in Roneria."

``parse_marked`` strips the markers, giving the plain rewritten text and each mention's character
range in it (and which ``[LK]`` closed it). Offsets come from decoding *prefixes* of the plain
tokens, so tokenizers whose pieces decode differently alone (SentencePiece's leading space) still
give exact offsets.

``align_mentions`` maps those ranges onto the original text. A faithful rewrite differs from the
original only by the leading space the template adds, but a model may drop, add or change words;
the two strings are aligned character by character (``difflib.SequenceMatcher``) and a mention
keeps its span when both its ends are aligned characters at the same distance apart. Otherwise its
surface is looked up in the original and the occurrence nearest to where the alignment puts it
(not before the previous mention) is taken — so a name that occurs twice resolves to the right
occurrence. A mention that cannot be placed is ``None`` (reported as unaligned, never guessed).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Sequence


@dataclass
class MarkedMention:
    start: int  # character offsets in MarkedOutput.text (end exclusive)
    end: int
    link: int  # index of the [LK] that closed it (0-based, in output order)


@dataclass
class MarkedOutput:
    text: str  # the output with every marker removed
    mentions: list[MarkedMention]
    stray_links: list[int]  # [LK]s with no open <m> before them (no span)

    def surface(self, m: MarkedMention) -> str:
        return self.text[m.start:m.end]


def parse_marked(ids: Sequence[int], tokenizer: Any, *, mention_open: int, lk: int, con: int,
                 eos: int | None = None, ignore: Sequence[int] = ()) -> MarkedOutput:
    """Split a generated EL output into plain text and marked mentions.

    ``<m>`` opens a mention, ``[LK]`` closes it; ``[CON]`` and ``ignore`` ids are dropped; decoding
    stops at ``eos``. A ``<m>`` inside an open mention restarts it; an unclosed one is dropped.
    """
    plain: list[int] = []
    events: list[tuple[str, int]] = []  # (kind, number of plain tokens before it)
    skip = set(int(i) for i in ignore) | {int(con)}
    for t in ids:
        t = int(t)
        if eos is not None and t == eos:
            break
        if t == mention_open:
            events.append(("open", len(plain)))
        elif t == lk:
            events.append(("link", len(plain)))
        elif t not in skip:
            plain.append(t)

    cache: dict[int, int] = {}

    def offset(n: int) -> int:
        if n not in cache:
            cache[n] = len(tokenizer.decode(plain[:n], skip_special_tokens=False, clean_up_tokenization_spaces=False))
        return cache[n]

    text = tokenizer.decode(plain, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    mentions: list[MarkedMention] = []
    stray: list[int] = []
    open_at: int | None = None
    n_links = 0
    for kind, n in events:
        if kind == "open":
            open_at = offset(n)
            continue
        if open_at is None:
            stray.append(n_links)
        else:
            mentions.append(MarkedMention(open_at, offset(n), n_links))
            open_at = None
        n_links += 1
    return MarkedOutput(text, mentions, stray)


def _trim(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def align_mentions(out: MarkedOutput, original: str) -> list[tuple[int, int] | None]:
    """For each of ``out.mentions``, its ``(start, end)`` in ``original``, or None when unplaceable."""
    g = out.text
    gmap = [-1] * (len(g) + 1)
    matcher = difflib.SequenceMatcher(None, g, original, autojunk=False)
    for a, b, size in matcher.get_matching_blocks():
        for i in range(size):
            gmap[a + i] = b + i

    def estimate(pos: int) -> int:
        """Where generated position ``pos`` falls in the original: the nearest aligned char to its left."""
        for p in range(min(pos, len(g) - 1), -1, -1):
            if gmap[p] >= 0:
                return gmap[p] + (pos - p)
        return pos

    spans: list[tuple[int, int] | None] = []
    floor = 0  # mentions come in text order: never place one before the previous one's end
    for m in out.mentions:
        gs, ge = _trim(g, m.start, m.end)
        if gs >= ge:
            spans.append(None)
            continue
        s, e = gmap[gs], gmap[ge - 1]
        if s >= floor and e >= 0 and e - s == ge - 1 - gs:
            spans.append((s, e + 1))
            floor = e + 1
            continue
        surface = g[gs:ge]
        hits, i = [], original.find(surface, floor)
        while i >= 0:
            hits.append(i)
            i = original.find(surface, i + 1)
        if not hits:
            spans.append(None)
            continue
        want = estimate(gs)
        best = min(hits, key=lambda h: (abs(h - want), h))
        spans.append((best, best + len(surface)))
        floor = best + len(surface)
    return spans
