"""Questions of the synthetic world in the HotpotQA layout (plus 2Wiki's evidence triples): bridge and comparison."""

from __future__ import annotations

import random
from typing import Any

from data_prep.synthetic_world import ATTRS, BRIDGE_TEMPLATE, COMPARISONS, RELATIONS, World

# ---------------------------------------------------------------------------------------------
# Questions (HotpotQA layout)


def _hex_id(rng: random.Random, used: set[str]) -> str:
    while True:
        h = f"{rng.getrandbits(96):024x}"
        if h not in used:
            used.add(h)
            return h


class QuestionMaker:
    def __init__(self, world: World, split: str, rng: random.Random, used_ids: set[str]) -> None:
        self.w, self.split, self.rng, self.used_ids = world, split, rng, used_ids
        self.cfg = world.cfg
        self.pool = world.world_ids[split]
        self.seen: set[str] = set()
        self.n_hard = round(self.cfg.distractors * self.cfg.hard_distractor_fraction)

    def make(self) -> dict[str, Any]:
        # The type is drawn once so that the type mix holds; within it, retry a few times to avoid
        # repeating a question (a small world may run out of distinct ones: then repeats are fine).
        draw = self._comparison if self.rng.random() < self.cfg.comparison_fraction else self._bridge
        q = None
        for _ in range(20):
            cand = draw()
            if cand is not None:
                q = cand
                if cand[0] not in self.seen:
                    break
        while q is None:  # every entity has a usable relation, so this is only a guard against bad luck
            q = draw()
        self.seen.add(q[0])
        question, answer, qtype, facts = q
        gold = list(dict.fromkeys(i for i, _ in facts))
        distractors = self._distractors(gold)
        paragraphs = gold + distractors
        self.rng.shuffle(paragraphs)
        ents = self.w.entities
        # 2WikiMultihopQA layout (HotpotQA's plus evidence triples, one per hop): the 2Wiki reader
        # turns each triple into the short lead the model writes before that hop's [RQ].
        evidences = [[ents[i].name, a, self.w.value_text(ents[i], a)] for i, a in facts]
        return {
            "_id": _hex_id(self.rng, self.used_ids),
            "type": qtype,
            "question": question,
            "context": [[ents[i].name, ents[i].sentences] for i in paragraphs],
            "entity_ids": "_".join(ents[i].eid for i in gold),
            "supporting_facts": [[ents[i].name, ents[i].fact_sentence[a]] for i, a in facts],
            "evidences": evidences,
            "answer": answer,
            "evidences_id": [[ents[i].eid, a, self._value_id(ents[i], a)] for i, a in facts],
            "answer_id": None,
        }

    def _value_id(self, e, attr: str) -> str:
        value = e.values[attr]
        return self.w.entities[value].eid if attr in RELATIONS[e.kind] else str(value)

    def _bridge(self) -> tuple[str, str, str, list[tuple[int, str]]] | None:
        ents = self.w.entities
        e1 = ents[self.rng.choice(self.pool)]
        rels = [r for r in RELATIONS[e1.kind] if r in e1.values]
        if not rels:
            return None
        rel = self.rng.choice(rels)
        e2 = ents[e1.values[rel]]
        attrs = [a for a in ATTRS[e2.kind] if a in e2.values and self.w.value_text(e2, a) != e1.name]
        if not attrs:
            return None
        attr = self.rng.choice(attrs)
        question = BRIDGE_TEMPLATE.format(attr=attr, rel=rel, e1=e1.name)
        return question, self.w.value_text(e2, attr), "compositional", [(e1.index, rel), (e2.index, attr)]

    def _comparison(self) -> tuple[str, str, str, list[tuple[int, str]]] | None:
        template, kind, attr, pick = self.rng.choice(COMPARISONS)
        members = self.w.by_split_kind[(self.split, kind)]
        a, b = self.rng.sample(members, 2)
        ea, eb = self.w.entities[a], self.w.entities[b]
        va, vb = ea.values[attr], eb.values[attr]
        if va == vb:
            return None
        winner = ea if pick(va, vb) == va else eb
        return template.format(a=ea.name, b=eb.name), winner.name, "comparison", [(a, attr), (b, attr)]

    def _distractors(self, gold: list[int]) -> list[int]:
        """K distinct non-gold paragraphs of the split; some "hard" ones name a gold entity or share its first syllable."""
        k = self.cfg.distractors
        excluded = set(gold)
        hard_pool: list[int] = []
        for g in gold:
            hard_pool += self.w.mentioned_by.get(g, [])
            hard_pool += self.w.by_first_syllable.get((self.split, self.w.entities[g].name[:2].lower()), [])
        hard_pool = [i for i in dict.fromkeys(hard_pool) if i not in excluded]
        chosen = self.rng.sample(hard_pool, min(self.n_hard, len(hard_pool), k))
        excluded.update(chosen)
        # rejection sampling: the pool is much larger than K (validated), so this ends fast
        while len(chosen) < k:
            i = self.rng.choice(self.pool)
            if i not in excluded:
                excluded.add(i)
                chosen.append(i)
        return chosen
