"""One growing context decoded through a KV cache: every token goes through the model exactly once.

``push`` appends tokens to the context; ``forward`` runs the base transformer over the tokens not
yet in the cache (only those: the prefix is never re-run) and returns their last-layer states and
the next-token logits of the last one. The logits come from applying the LM head to that one
state, so no forward computes full-vocabulary logits for a whole prefill.

Why a token may wait in the context before it is fed: greedy decoding picks token t from the
previous forward's logits; t's own state (and the logits for t+1) only exist once t is fed. The
state *at* ``[RQ]`` is therefore the output of the forward whose input is ``[RQ]`` — exactly the
state a fresh forward of the whole prefix gives at that position (causal attention), which is the
query vector OneGen needs, with no second pass.

Several contexts share one forward with :class:`BatchedKV` (batched decoding): each keeps its own
positions, and the cache slots another context filled are masked out for it.

Note: the LM head alone gives the logits of Llama/Qwen2/Mistral; models with a final logit
soft-cap or scale (Gemma2, Cohere) differ by a monotonic map, so the greedy argmax is the same.
"""

from __future__ import annotations

import inspect
from collections import Counter
from dataclasses import dataclass
from typing import Any, Generator, Sequence

import torch

from evaluation.runtime import Runtime
from onegen.errors import OneGenError


class ContextFull(OneGenError):
    """The context would exceed the model's maximum positions."""


@dataclass
class ForwardOut:
    hidden: torch.Tensor  # [n_fed, H] last-layer states of the tokens just fed
    logits: torch.Tensor  # [V] float32 next-token logits after the last fed token


def _cache_kwarg(decoder: torch.nn.Module) -> str:
    """transformers 5 names the cache argument ``cache``; 4.x names it ``past_key_values``."""
    params = inspect.signature(decoder.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def new_cache(model: torch.nn.Module):
    # heavy (transformers): imported where a cache is made; importing this module does not load it
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # older transformers
        return DynamicCache()


class Context:
    """The token bookkeeping of one context: what is in it, what has been fed, forwards by kind.

    It owns no cache: :class:`KVSession` runs its forwards alone, :class:`BatchedKV` runs several
    contexts' forwards together.
    """

    def __init__(self, max_positions: int) -> None:
        self.context: list[int] = []
        self.fed = 0
        self.max_positions = max_positions
        self.forwards: Counter = Counter()
        self.tokens_fed = 0

    @property
    def pending(self) -> int:
        """Tokens in the context not yet run through the model."""
        return len(self.context) - self.fed

    def room(self) -> int:
        """How many more tokens fit in the context."""
        return self.max_positions - len(self.context)

    def push(self, ids: Sequence[int]) -> None:
        if len(self.context) + len(ids) > self.max_positions:
            raise ContextFull(f"context of {len(self.context)} + {len(ids)} tokens exceeds the model's "
                              f"{self.max_positions} positions")
        self.context.extend(int(i) for i in ids)

    def take(self, kind: str) -> list[int]:
        """The pending tokens, now counted as fed by one forward of ``kind``."""
        new = self.context[self.fed:]
        if not new:
            raise RuntimeError("nothing to feed: push tokens first")
        self.fed = len(self.context)
        self.forwards[kind] += 1
        self.tokens_fed += len(new)
        return new

    def counts(self) -> dict[str, int]:
        return dict(self.forwards)


class KVSession(Context):
    """A context and its own KV cache (batch 1); counts forwards by kind (``decode``, ``prefill``, ...)."""

    def __init__(self, rt: Runtime, max_positions: int | None = None) -> None:
        super().__init__(max_positions or rt.max_positions)
        self.decoder = rt.decoder
        self.head = rt.model.get_output_embeddings()
        self.device = rt.device
        self.cache = new_cache(rt.model)
        self._kw = _cache_kwarg(self.decoder)

    @torch.no_grad()
    def forward(self, kind: str) -> ForwardOut:
        """Feed every pending token in one forward (``kind`` only labels the count)."""
        ids = torch.tensor([self.take(kind)], dtype=torch.long, device=self.device)
        # The DynamicCache is extended in place (no need to read it back from the output).
        out = self.decoder(input_ids=ids, use_cache=True, **{self._kw: self.cache})
        hidden = out.last_hidden_state[0]
        logits = self.head(hidden[-1:]).float()[0]
        return ForwardOut(hidden, logits)


class BatchedKV:
    """``n`` independent contexts decoded together through one KV cache of ``n`` rows.

    Each forward feeds every requesting context's pending tokens, left-aligned in a ``[n, T]``
    block (``T`` = the most any of them feeds). The slots a context leaves empty, and all ``T``
    slots of a context that feeds nothing this time, are holes: masked out as keys for good, and
    not counted in the context's positions, so each context sees exactly the keys and RoPE
    positions it would see alone (equal states up to float summation order). A context feeds in
    the first forward or never: a hole query then always has at least slot 0 of its own row to
    attend to (a fully masked attention row gives NaN, which stays in the row of a context that
    never feeds).
    """

    def __init__(self, rt: Runtime, n: int, max_positions: int | None = None) -> None:
        self.rows = [Context(max_positions or rt.max_positions) for _ in range(n)]
        self.decoder = rt.decoder
        self.head = rt.model.get_output_embeddings()
        self.device = rt.device
        self.cache = new_cache(rt.model)
        self._kw = _cache_kwarg(self.decoder)
        self.mask = torch.zeros(n, 0, dtype=torch.long, device=self.device)
        self.live: set[int] | None = None  # the contexts fed in the first forward

    @torch.no_grad()
    def forward(self, requests: dict[int, str]) -> dict[int, ForwardOut]:
        """One forward for the contexts in ``requests`` (row -> kind); their outputs by row."""
        if not requests:
            raise RuntimeError("no context asked for a forward")
        if self.live is None:
            self.live = set(requests)
        elif not self.live.issuperset(requests):
            raise RuntimeError(f"contexts {sorted(set(requests) - self.live)} did not feed in the first forward")
        start = {b: self.rows[b].fed for b in range(len(self.rows))}
        new = {b: self.rows[b].take(kind) for b, kind in requests.items()}
        n, width = len(self.rows), max(len(t) for t in new.values())
        ids = torch.zeros(n, width, dtype=torch.long)
        real = torch.zeros(n, width, dtype=torch.long)
        for b, toks in new.items():
            ids[b, :len(toks)] = torch.tensor(toks, dtype=torch.long)
            real[b, :len(toks)] = 1
        positions = torch.tensor([start[b] for b in range(n)], dtype=torch.long)[:, None] + torch.arange(width)
        self.mask = torch.cat([self.mask, real.to(self.device)], dim=1)
        out = self.decoder(input_ids=ids.to(self.device), attention_mask=self.mask,
                           position_ids=positions.to(self.device), use_cache=True, **{self._kw: self.cache})
        rows = list(new)
        last = out.last_hidden_state[torch.tensor(rows), torch.tensor([len(new[b]) - 1 for b in rows])]
        logits = self.head(last).float()  # one LM-head pass for all rows: its weights are read once
        return {b: ForwardOut(out.last_hidden_state[b, :len(new[b])], logits[i]) for i, b in enumerate(rows)}


# A decoding loop as a generator: it yields the kind of each forward it needs (its pending tokens are
# fed), receives that forward's output, and returns its result.
Steps = Generator[str, ForwardOut, Any]


def drive(steps: Steps, session: KVSession) -> Any:
    """Run one decoding loop through its own KV cache (batch 1); its result."""
    try:
        kind = next(steps)
        while True:
            kind = steps.send(session.forward(kind))
    except StopIteration as done:
        return done.value


def drive_batched(kv: BatchedKV, loops: Sequence[Steps]) -> list[Any]:
    """Run ``loops`` (loop ``b`` over ``kv.rows[b]``) together, one forward per step; their results.

    A forward is as wide as its longest request for EVERY row of the cache, so one paragraph next to
    single-token decodes costs rows x paragraph tokens. Wide requests (more than 2 tokens) therefore
    wait while most loops are narrow, and go together once they are at least half of them. A loop
    only waits: nothing it computes changes.
    """
    results: list[Any] = [None] * len(loops)
    requests: dict[int, str] = {}

    def advance(b: int, out: ForwardOut | None) -> None:
        try:
            requests[b] = next(loops[b]) if out is None else loops[b].send(out)
        except StopIteration as done:
            results[b] = done.value

    for b in range(len(loops)):
        advance(b, None)  # a loop that stops before feeding anything (prompt too long) never feeds
    while requests:
        narrow = {b: k for b, k in requests.items() if kv.rows[b].pending <= 2}
        wide = len(requests) - len(narrow)
        batch = narrow if narrow and 2 * wide < len(requests) else dict(requests)
        for b in batch:
            del requests[b]
        for b, out in kv.forward(batch).items():
            advance(b, out)
    return results  # every loop has stopped: none has a request left
