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

Note: the LM head alone gives the logits of Llama/Qwen2/Mistral; models with a final logit
soft-cap or scale (Gemma2, Cohere) differ by a monotonic map, so the greedy argmax is the same.
"""

from __future__ import annotations

import inspect
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

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
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # older transformers
        return DynamicCache()


class KVSession:
    """A context and its KV cache; counts forwards by kind (``decode``, ``prefill``, ...)."""

    def __init__(self, rt: Runtime, max_positions: int | None = None) -> None:
        self.rt = rt
        self.decoder = rt.decoder
        self.head = rt.model.get_output_embeddings()
        self.device = rt.device
        self.cache = new_cache(rt.model)
        self._kw = _cache_kwarg(self.decoder)
        self.context: list[int] = []
        self.fed = 0
        self.max_positions = max_positions or rt.max_positions
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

    @torch.no_grad()
    def forward(self, kind: str) -> ForwardOut:
        """Feed every pending token in one forward (``kind`` only labels the count)."""
        new = self.context[self.fed:]
        if not new:
            raise RuntimeError("nothing to feed: push tokens first")
        ids = torch.tensor([new], dtype=torch.long, device=self.device)
        # The DynamicCache is extended in place (no need to read it back from the output).
        out = self.decoder(input_ids=ids, use_cache=True, **{self._kw: self.cache})
        hidden = out.last_hidden_state[0]
        self.fed = len(self.context)
        self.forwards[kind] += 1
        self.tokens_fed += len(new)
        logits = self.head(hidden[-1:]).float()[0]
        return ForwardOut(hidden, logits)

    def counts(self) -> dict[str, int]:
        return dict(self.forwards)
