"""Entity-linking sentences of the synthetic world in the ELEVANT layout, with namesakes and ``<NIL>`` mentions."""

from __future__ import annotations

import random
import re
from typing import Any, Sequence

from data_prep.synthetic_world import CITY, EL_FRAMES, KIND_TYPE, KINDS, NIL_ID, OCCUPATIONS, PERSON, Entity, World

# ---------------------------------------------------------------------------------------------
# Entity linking (ELEVANT layout)


class LinkingMaker:
    def __init__(self, world: World, split: str, rng: random.Random, nil_fraction: float, nil_names: list[str]) -> None:
        self.w, self.split, self.rng = world, split, rng
        self.cfg = world.cfg
        self.nil_fraction, self.nil_names = nil_fraction, nil_names
        ents = world.split_entities(split)
        self.by_kind = {k: [e.index for e in ents if e.kind == k] for k in KINDS}
        self.ambiguous = {i for idx in world.by_name.values() if len(idx) > 1 for i in idx
                          if world.entities[i].split == split}
        self.ambiguous_by_kind = {k: [i for i in self.by_kind[k] if i in self.ambiguous] for k in KINDS}
        self.frames = [f for f in EL_FRAMES if len(f[0]) <= self.cfg.max_mentions]
        self.frames_by_subject = {k: [f for f in self.frames if f[0][0] == k] for k in KINDS}

    def make(self, doc_id: int) -> dict[str, Any]:
        rng = self.rng
        subject: int | None = None
        if rng.random() < self.cfg.ambiguous_el_fraction:
            kinds = [k for k in KINDS if self.ambiguous_by_kind[k]]
            if kinds:
                subject = rng.choice(self.ambiguous_by_kind[rng.choice(kinds)])
        if subject is not None:
            slots, frame = rng.choice(self.frames_by_subject[self.w.entities[subject].kind])
        else:
            slots, frame = rng.choice(self.frames)
        fillers = self._fill(slots, subject)
        nil_slot = None
        if rng.random() < self.nil_fraction and self.nil_names:
            persons = [s for s, k in enumerate(slots) if k == PERSON]
            if persons:
                nil_slot = rng.choice(persons)
        budget = self.cfg.max_mentions - len(slots)
        pieces: list[tuple[str, Any]] = []
        for part_i, part in enumerate(re.split(r"\{(\d)\}", frame)):
            if part_i % 2 == 0:
                pieces.append((part, None))
                continue
            s = int(part)
            if s == nil_slot:
                phrase, extra = self._nil_phrase(s == 0)
            else:
                phrase, extra = self._phrase(self.w.entities[fillers[s]], s == 0, budget, fillers)
            budget -= extra
            pieces += phrase
        return self._record(doc_id, pieces)

    def _fill(self, slots: Sequence[str], subject: int | None) -> list[int]:
        chosen: list[int] = []
        names: set[str] = set()
        for s, kind in enumerate(slots):
            if s == 0 and subject is not None:
                i = subject
            else:
                while True:
                    i = self.rng.choice(self.by_kind[kind])
                    if self.w.entities[i].name not in names:
                        break
            chosen.append(i)
            names.add(self.w.entities[i].name)
        return chosen

    def _phrase(self, e: Entity, subject: bool, budget: int, taken: list[int]) -> tuple[list[tuple[str, Any]], int]:
        """Pieces of one mention with enough context to tell it from its namesake; returns (pieces, extra mentions)."""
        rng, ents = self.rng, self.w.entities
        forms = []
        ambiguous = e.index in self.ambiguous
        if e.kind == PERSON:
            occ = e.values["occupation"]
            home = ents[e.values["hometown"]]
            if budget > 0 and home.name not in {ents[t].name for t in taken}:
                # a hometown whose name is shared (with a person or company) is marked as the city
                at = " from the city of " if home.index in self.ambiguous else " from "
                if subject:
                    forms.append(([(e.name, e), (f", the {occ}{at}", None), (home.name, home), (",", None)], 1))
                forms.append(([(f"the {occ} ", None), (e.name, e), (at, None), (home.name, home)], 1))
            if subject:
                forms.append(([(e.name, e), (f", the {occ},", None)], 0))
            forms.append(([(f"the {occ} ", None), (e.name, e)], 0))
        elif e.kind == CITY:
            if subject:
                forms.append(([(e.name, e), (f", a city in {e.values['country']},", None)], 0))
            forms.append(([("the city of ", None), (e.name, e)], 0))
        else:
            product = e.values["product"]
            if subject:
                forms.append(([(e.name, e), (f", the {product} company,", None)], 0))
            forms.append(([(f"the {product} company ", None), (e.name, e)], 0))
        if not ambiguous:
            forms.append(([(e.name, e)], 0))  # a bare name only where the name alone decides
        return rng.choice(forms)

    def _nil_phrase(self, subject: bool) -> tuple[list[tuple[str, Any]], int]:
        name = self.rng.choice(self.nil_names)
        occ = self.rng.choice(OCCUPATIONS)
        if subject:
            return [(name, NIL_ID), (f", the {occ},", None)], 0
        return [(f"the {occ} ", None), (name, NIL_ID)], 0

    def _record(self, doc_id: int, pieces: list[tuple[str, Any]]) -> dict[str, Any]:
        text_parts: list[str] = []
        labels: list[dict[str, Any]] = []
        pos = 0
        for text, ent in pieces:
            if pos == 0 and text:
                text = text[0].upper() + text[1:]
            if ent is not None:
                if ent == NIL_ID:
                    # the real ELEVANT files label NIL mentions with name "Unknown", type "OTHER"
                    eid, name, typ = NIL_ID, "Unknown", "OTHER"
                else:
                    eid, name, typ = ent.eid, ent.name, KIND_TYPE[ent.kind]
                labels.append({"id": len(labels), "span": [pos, pos + len(text)], "entity_id": eid, "name": name, "type": typ})
            text_parts.append(text)
            pos += len(text)
        text = "".join(text_parts)
        return {
            "id": doc_id,
            "title": f"synthetic://onegen-world/seed-{self.cfg.seed}/el_{self.split}/{doc_id}",
            "text": text,
            "evaluation_span": [0, len(text)],
            "labels": labels,
        }
