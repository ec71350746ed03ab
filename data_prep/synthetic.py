"""A synthetic multi-hop world, written in the real benchmark layouts so the same readers read it.

A tiny causal LM trained from scratch on a CPU in minutes can only learn OneGen's two tasks if the
world is small and regular: entity names are new *combinations* of a few syllables ("Bo-ra-mi-n"
→ "Boramin"), every fact is a short template sentence ("Boramin's birth year is 1934."), and
the dev split uses entities that never occur in train, so dev questions can only be answered by
retrieving. Everything is a pure function of the seed (``random.Random`` streams only): the same
seed gives byte-identical files.

Files written to ``out_dir``:

* ``train.json``, ``dev.json``: HotpotQA layout (``_id, answer, question, supporting_facts,
  context, type, level``) plus 2Wiki's ``entity_ids, evidences, evidences_id, answer_id`` (the 2WikiMultihopQA
  layout; one evidence triple per hop), bridge ("compositional") and comparison questions, 2 gold + ``distractors`` paragraphs.
* ``el_train.jsonl``, ``el_dev.jsonl``: ELEVANT layout; some names are shared by two entities
  (only the context words tell them apart); dev has ``<NIL>`` mentions (names not in the KB;
  ``name`` "Unknown", ``type`` "OTHER", as in the real ELEVANT files).
* ``kb.jsonl``: ``{id, name, description}`` of every entity of both splits.
* ``world.json``: the config, counts and a sha256 of every file.

Usage::

    python -m data_prep.synthetic --out data/synthetic --seed 0 --train-questions 2000
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from onegen.errors import ConfigError
from onegen.manifest import atomic_write_bytes

# ---------------------------------------------------------------------------------------------
# Vocabulary: kept small on purpose (a BPE of a few thousand tokens must cover all of it).

CONSONANTS = "bdgklmnrstvz"
VOWELS = "aeiou"
SYLLABLES = [c + v for c in CONSONANTS for v in VOWELS]
CODAS = ["", "", "n", "r", "s"]  # "" twice: half the names end in a vowel
COUNTRY_SUFFIXES = ["via", "nia", "ria"]  # names never end in "ia", so countries cannot collide

OCCUPATIONS = ["painter", "singer", "farmer", "doctor", "writer", "teacher", "pilot", "baker", "dancer", "sailor"]
COLORS = ["red", "blue", "green", "yellow", "black", "white", "purple", "orange"]
PRODUCTS = ["tea", "salt", "glass", "paper", "steel", "cheese", "soap", "wine"]
SPORTS = ["chess", "tennis", "rowing", "football", "golf", "boxing"]
N_COUNTRIES = 8

PERSON, CITY, COMPANY = "person", "city", "company"
KINDS = (PERSON, CITY, COMPANY)
KIND_SHARE = {PERSON: 0.5, CITY: 0.25, COMPANY: 0.25}
# ELEVANT labels carry Wikidata type ids; these are the real ones for the three kinds.
KIND_TYPE = {PERSON: "Q215627", CITY: "Q515", COMPANY: "Q783794"}
NIL_ID = "<NIL>"

# Attributes per kind, in the order facts are generated. Entity-valued ones are relations
# (the first hop of a bridge question): attribute -> kind of the entity it points to.
ATTRS = {
    PERSON: ["birth year", "occupation", "favorite color", "hometown", "employer", "spouse"],
    CITY: ["country", "population", "founding year", "mayor", "favorite sport"],
    COMPANY: ["founder", "headquarters", "founding year", "product", "logo color"],
}
RELATIONS = {
    PERSON: {"spouse": PERSON, "hometown": CITY, "employer": COMPANY},
    CITY: {"mayor": PERSON},
    COMPANY: {"founder": PERSON, "headquarters": CITY},
}
# (question template, kind, attribute, pick) for comparison questions; pick=min → smaller value wins.
COMPARISONS = [
    ("Who was born first, {a} or {b}?", PERSON, "birth year", min),
    ("Which city is larger, {a} or {b}?", CITY, "population", max),
    ("Which city was founded first, {a} or {b}?", CITY, "founding year", min),
    ("Which company was founded first, {a} or {b}?", COMPANY, "founding year", min),
]
BRIDGE_TEMPLATE = "What is the {attr} of the {rel} of {e1}?"

# Entity-linking sentence frames: slot kinds, then the text. Slot 0 is always the subject at the
# start of the sentence, the only place an appositive ("X, the painter from Y,") reads naturally.
EL_FRAMES: list[tuple[tuple[str, ...], str]] = [
    ((PERSON,), "{0} won a prize."),
    ((PERSON,), "{0} gave a talk in spring."),
    ((PERSON, PERSON), "{0} met {1} at a party."),
    ((PERSON, PERSON), "{0} wrote a letter to {1}."),
    ((PERSON, CITY), "{0} moved to {1}."),
    ((PERSON, CITY), "{0} visited {1} last year."),
    ((PERSON, COMPANY), "{0} joined {1}."),
    ((PERSON, COMPANY), "{0} left {1} in winter."),
    ((CITY,), "{0} hosted a big fair."),
    ((CITY, PERSON), "{0} gave a medal to {1}."),
    ((CITY, CITY), "{0} and {1} signed a trade deal."),
    ((COMPANY,), "{0} opened a new shop."),
    ((COMPANY, CITY), "{0} opened a shop in {1}."),
    ((COMPANY, PERSON), "{0} hired {1}."),
    ((COMPANY, COMPANY), "{0} bought {1}."),
    ((PERSON, PERSON, CITY), "{0} and {1} met in {2}."),
    ((PERSON, COMPANY, CITY), "{0} left {1} and moved to {2}."),
    ((COMPANY, PERSON, CITY), "{0} sent {1} to {2}."),
]

# Progress bars only when generation would take more than a few seconds (~20k questions/s here).
PROGRESS_MIN_UNITS = 100_000


@dataclass
class WorldConfig:
    seed: int = field(default=0, metadata={"help": "random seed; the same seed gives byte-identical files"})
    n_train_entities: int = field(default=2500, metadata={"help": "entities (paragraphs) of the train world"})
    n_dev_entities: int = field(default=300, metadata={"help": "entities of the dev world (never seen in train)"})
    n_train_questions: int = field(default=2000, metadata={"help": "train questions (train.json)"})
    n_dev_questions: int = field(default=200, metadata={"help": "dev questions (dev.json)"})
    n_train_el: int = field(default=1000, metadata={"help": "entity-linking sentences in el_train.jsonl"})
    n_dev_el: int = field(default=100, metadata={"help": "entity-linking sentences in el_dev.jsonl"})
    distractors: int = field(default=8, metadata={"help": "distractor paragraphs per question (HotpotQA has 8)"})
    hard_distractor_fraction: float = field(
        default=0.5,
        metadata={"help": "share of distractors drawn from paragraphs that mention a gold entity or share its first syllable"},
    )
    comparison_fraction: float = field(default=0.2, metadata={"help": "share of comparison questions (the rest are bridge)"})
    homonym_fraction: float = field(
        default=0.1, metadata={"help": "share of entities that get a KB-only namesake (entity-linking ambiguity)"}
    )
    ambiguous_el_fraction: float = field(
        default=0.4, metadata={"help": "share of EL sentences whose subject has a name shared by two entities"}
    )
    max_mentions: int = field(default=3, metadata={"help": "most labelled mentions in one EL sentence (1..3)"})
    nil_fraction_train: float = field(
        default=0.0, metadata={"help": "share of train EL sentences where a person slot gets a <NIL> name (not in the KB)"}
    )
    nil_fraction_dev: float = field(
        default=0.1, metadata={"help": "share of dev EL sentences where a person slot gets a <NIL> name (not in the KB)"}
    )

    def validate(self) -> None:
        ints = ["n_train_entities", "n_dev_entities", "n_train_questions", "n_dev_questions", "n_train_el", "n_dev_el", "distractors"]
        for name in ints:
            if getattr(self, name) < 0:
                raise ConfigError(f"WorldConfig.{name} must be >= 0, got {getattr(self, name)}")
        fracs = ["hard_distractor_fraction", "comparison_fraction", "homonym_fraction", "ambiguous_el_fraction",
                 "nil_fraction_train", "nil_fraction_dev"]
        for name in fracs:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"WorldConfig.{name} must be in [0, 1], got {getattr(self, name)}")
        if not 1 <= self.max_mentions <= 3:
            raise ConfigError(f"WorldConfig.max_mentions must be 1, 2 or 3, got {self.max_mentions}")
        for split in ("train", "dev"):
            n = getattr(self, f"n_{split}_entities")
            # each kind needs two members (spouses, comparisons) and every question 2 + K distinct paragraphs
            need = max(12, self.distractors + 2)
            if n < need:
                raise ConfigError(
                    f"WorldConfig.n_{split}_entities={n} is too small: need at least {need} "
                    f"(2 gold + {self.distractors} distractors per question, and every kind twice)"
                )


# ---------------------------------------------------------------------------------------------
# The world model


@dataclass
class Entity:
    index: int  # position in World.entities
    eid: str
    name: str
    kind: str
    split: str
    in_world: bool  # False for KB-only namesakes (entity linking only, never a paragraph)
    values: dict[str, Any] = field(default_factory=dict)  # attribute -> str/int, or entity index for relations
    sentences: list[str] = field(default_factory=list)  # the paragraph (HotpotQA sentences)
    fact_sentence: dict[str, int] = field(default_factory=dict)  # attribute -> sentence index
    description: str = ""


class NameGenerator:
    """Unique syllable names; also reserves words so no name equals a country or template word."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.used: set[str] = set()
        for w in _template_words():
            self.used.add(w.lower())

    def new(self) -> str:
        for _ in range(10_000):
            k = self.rng.choice((2, 2, 3))
            name = "".join(self.rng.choice(SYLLABLES) for _ in range(k)) + self.rng.choice(CODAS)
            if name not in self.used:
                self.used.add(name)
                return name.capitalize()
        raise ConfigError("ran out of syllable names: lower n_train_entities/n_dev_entities")

    def country(self) -> str:
        while True:
            name = "".join(self.rng.choice(SYLLABLES) for _ in range(2)) + self.rng.choice(COUNTRY_SUFFIXES)
            if name not in self.used:
                self.used.add(name)
                return name.capitalize()


def _template_words() -> set[str]:
    texts = [BRIDGE_TEMPLATE] + [c[0] for c in COMPARISONS] + [f[1] for f in EL_FRAMES]
    texts += OCCUPATIONS + COLORS + PRODUCTS + SPORTS + [a for attrs in ATTRS.values() for a in attrs]
    texts += ["is a from city in company the of maker Unknown OTHER"]
    return {w for t in texts for w in re.findall(r"[A-Za-z]+", t)}


class World:
    """All entities of both splits plus per-split indexes used to draw questions fast."""

    def __init__(self, cfg: WorldConfig) -> None:
        self.cfg = cfg
        rng = random.Random(f"{cfg.seed}:world")
        self.names = NameGenerator(rng)
        self.countries = [self.names.country() for _ in range(N_COUNTRIES)]
        self.entities: list[Entity] = []
        self.by_split_kind: dict[tuple[str, str], list[int]] = {}
        for split, n in (("train", cfg.n_train_entities), ("dev", cfg.n_dev_entities)):
            self._make_split(rng, split, n)
        for split in ("train", "dev"):
            self._make_namesakes(rng, split)
        # ids follow creation order: train world, dev world, train namesakes, dev namesakes
        width = max(5, len(str(len(self.entities) - 1)))
        for e in self.entities:
            e.eid = f"E{e.index:0{width}d}"
        for e in self.entities:
            e.description = self._description(e)
            if e.in_world:
                self._paragraph(rng, e)
        self._index()

    # -- construction -------------------------------------------------------------------------

    def _add(self, name: str, kind: str, split: str, in_world: bool) -> Entity:
        e = Entity(index=len(self.entities), eid="", name=name, kind=kind, split=split, in_world=in_world)
        self.entities.append(e)
        return e

    def _make_split(self, rng: random.Random, split: str, n: int) -> None:
        n_city = max(2, round(n * KIND_SHARE[CITY]))
        n_company = max(2, round(n * KIND_SHARE[COMPANY]))
        n_person = n - n_city - n_company
        kinds = [PERSON] * n_person + [CITY] * n_city + [COMPANY] * n_company
        rng.shuffle(kinds)
        members = {k: [] for k in KINDS}
        for kind in kinds:
            e = self._add(self.names.new(), kind, split, True)
            members[kind].append(e.index)
        for k in KINDS:
            self.by_split_kind[(split, k)] = members[k]
        persons, cities, companies = members[PERSON], members[CITY], members[COMPANY]
        for i in cities:
            v = self.entities[i].values
            v["country"] = rng.choice(self.countries)
            v["population"] = rng.randrange(10, 1000) * 1000
            v["founding year"] = rng.randrange(1200, 1900)
            v["mayor"] = rng.choice(persons)
            v["favorite sport"] = rng.choice(SPORTS)
        for i in companies:
            v = self.entities[i].values
            v["founder"] = rng.choice(persons)
            v["headquarters"] = rng.choice(cities)
            v["founding year"] = rng.randrange(1850, 2000)
            v["product"] = rng.choice(PRODUCTS)
            v["logo color"] = rng.choice(COLORS)
        for i in persons:
            v = self.entities[i].values
            v["birth year"] = rng.randrange(1900, 2000)
            v["occupation"] = rng.choice(OCCUPATIONS)
            v["favorite color"] = rng.choice(COLORS)
            v["hometown"] = rng.choice(cities)
            v["employer"] = rng.choice(companies)
        # spouses are mutual: pair persons up; with an odd count one person stays unmarried
        order = list(persons)
        rng.shuffle(order)
        for a, b in zip(order[0::2], order[1::2]):
            self.entities[a].values["spouse"] = b
            self.entities[b].values["spouse"] = a

    def _make_namesakes(self, rng: random.Random, split: str) -> None:
        """KB-only entities that share a name with a world entity of the same split.

        A namesake always differs from its twin in what the EL context states: a different kind, or
        (same kind) a different occupation / product. Cities never get a city namesake, so
        "from Kelu" is never ambiguous.
        """
        world = [i for k in KINDS for i in self.by_split_kind[(split, k)]]
        world.sort()
        n = round(len(world) * self.cfg.homonym_fraction)
        cities = self.by_split_kind[(split, CITY)]
        persons = self.by_split_kind[(split, PERSON)]
        for base_i in sorted(rng.sample(world, n)):
            base = self.entities[base_i]
            kind = rng.choice({PERSON: KINDS, CITY: (PERSON, COMPANY), COMPANY: (PERSON, COMPANY)}[base.kind])
            twin = self._add(base.name, kind, split, False)
            v = twin.values
            if kind == PERSON:
                v["occupation"] = rng.choice([o for o in OCCUPATIONS if o != base.values.get("occupation")])
                v["hometown"] = rng.choice([c for c in cities if c != base.values.get("hometown")] or cities)
                v["birth year"] = rng.randrange(1900, 2000)
            elif kind == CITY:
                v["country"] = rng.choice(self.countries)
            else:
                v["product"] = rng.choice([p for p in PRODUCTS if p != base.values.get("product")])
                v["headquarters"] = rng.choice([c for c in cities if c != base.values.get("headquarters")] or cities)
                v["founder"] = rng.choice(persons)

    def _description(self, e: Entity) -> str:
        v = e.values
        if e.kind == PERSON:
            return f"{e.name} is a {v['occupation']} from {self.entities[v['hometown']].name}."
        if e.kind == CITY:
            return f"{e.name} is a city in {v['country']}."
        return f"{e.name} is a {v['product']} company in {self.entities[v['headquarters']].name}."

    def value_text(self, e: Entity, attr: str) -> str:
        value = e.values[attr]
        if attr in RELATIONS[e.kind]:
            return self.entities[value].name
        return str(value)

    def _paragraph(self, rng: random.Random, e: Entity) -> None:
        attrs = [a for a in ATTRS[e.kind] if a in e.values]
        rng.shuffle(attrs)
        sentences = [e.description]
        for a in attrs:
            e.fact_sentence[a] = len(sentences)
            # HotpotQA keeps the space between sentences at the start of every sentence but the first
            sentences.append(f" {e.name}'s {a} is {self.value_text(e, a)}.")
        e.sentences = sentences

    def _index(self) -> None:
        self.world_ids: dict[str, list[int]] = {}
        self.mentioned_by: dict[int, list[int]] = {}  # entity -> world entities whose paragraph names it
        self.by_first_syllable: dict[tuple[str, str], list[int]] = {}
        self.by_name: dict[tuple[str, str], list[int]] = {}
        for e in self.entities:
            self.by_name.setdefault((e.split, e.name), []).append(e.index)
            if not e.in_world:
                continue
            self.world_ids.setdefault(e.split, []).append(e.index)
            self.by_first_syllable.setdefault((e.split, e.name[:2].lower()), []).append(e.index)
            for rel in RELATIONS[e.kind]:
                if rel in e.values:
                    self.mentioned_by.setdefault(e.values[rel], []).append(e.index)

    def split_entities(self, split: str) -> list[Entity]:
        return [e for e in self.entities if e.split == split]


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


# ---------------------------------------------------------------------------------------------
# Driver


def _progress(it: Iterable, total: int, desc: str, enabled: bool) -> Iterable:
    if not enabled:
        return it
    from tqdm import tqdm

    return tqdm(it, total=total, desc=desc, unit="ex", file=sys.stderr)


def generate_world(cfg: WorldConfig, out_dir: Path, progress: bool | None = None) -> dict[str, Any]:
    """Write the world's files to ``out_dir`` and return the summary (also written as ``world.json``).

    ``progress``: None shows progress bars only when the work is large.
    """
    cfg.validate()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    world = World(cfg)
    if progress is None:
        units = cfg.n_train_questions + cfg.n_dev_questions + cfg.n_train_el + cfg.n_dev_el
        progress = units >= PROGRESS_MIN_UNITS

    files: dict[str, bytes] = {}
    used_ids: set[str] = set()
    questions: dict[str, list[dict[str, Any]]] = {}
    for split, n in (("train", cfg.n_train_questions), ("dev", cfg.n_dev_questions)):
        maker = QuestionMaker(world, split, random.Random(f"{cfg.seed}:questions:{split}"), used_ids)
        questions[split] = [maker.make() for _ in _progress(range(n), n, f"{split} questions", progress)]
        files[f"{split}.json"] = json.dumps(questions[split]).encode()

    # NIL names are fresh syllable names, drawn after every entity name so no KB name is reused
    nil_names = {split: [world.names.new() for _ in range(8)] for split in ("train", "dev")}
    el: dict[str, list[dict[str, Any]]] = {}
    for split, n, nil_frac in (("train", cfg.n_train_el, cfg.nil_fraction_train), ("dev", cfg.n_dev_el, cfg.nil_fraction_dev)):
        maker = LinkingMaker(world, split, random.Random(f"{cfg.seed}:el:{split}"), nil_frac, nil_names[split])
        el[split] = [maker.make(i) for i in _progress(range(n), n, f"{split} EL sentences", progress)]
        files[f"el_{split}.jsonl"] = "".join(json.dumps(r) + "\n" for r in el[split]).encode()

    files["kb.jsonl"] = "".join(
        json.dumps({"id": e.eid, "name": e.name, "description": e.description}) + "\n" for e in world.entities
    ).encode()

    summary = _summary(cfg, world, questions, el, files)
    files["world.json"] = (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode()
    for name, data in files.items():
        atomic_write_bytes(out_dir / name, data)
    return summary


def _summary(cfg: WorldConfig, world: World, questions: dict, el: dict, files: dict[str, bytes]) -> dict[str, Any]:
    counts: dict[str, Any] = {}
    for split in ("train", "dev"):
        ents = world.split_entities(split)
        labels = [l for r in el[split] for l in r["labels"]]
        counts[split] = {
            "entities": {k: sum(e.in_world and e.kind == k for e in ents) for k in KINDS},
            "namesakes": sum(not e.in_world for e in ents),
            "questions": {t: sum(q["type"] == t for q in questions[split]) for t in ("compositional", "comparison")},
            "el_sentences": len(el[split]),
            "el_mentions": len(labels),
            "el_nil_mentions": sum(l["entity_id"] == NIL_ID for l in labels),
        }
    return {
        "generator": "data_prep.synthetic",
        "seed": cfg.seed,
        "config": dataclasses.asdict(cfg),
        "countries": world.countries,
        "kb_entities": len(world.entities),
        "shared_names": sum(len(v) > 1 for v in world.by_name.values()),
        "counts": counts,
        "files": {n: {"bytes": len(b), "sha256": hashlib.sha256(b).hexdigest()} for n, b in sorted(files.items())},
    }


def _flag(name: str) -> str:
    return "--" + name.removeprefix("n_").replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m data_prep.synthetic",
        description=(
            "Generate a deterministic synthetic multi-hop world: HotpotQA-layout train.json/dev.json, "
            "ELEVANT-layout el_train.jsonl/el_dev.jsonl, kb.jsonl and world.json. Dev uses entities that "
            "never appear in train, so dev questions can only be answered by retrieval."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument("--out", type=Path, required=True, help="output directory (created if missing)")
    p.add_argument("--progress", choices=["auto", "on", "off"], default="auto", help="progress bars")
    for f in dataclasses.fields(WorldConfig):
        p.add_argument(_flag(f.name), dest=f.name, type=type(f.default), default=f.default,
                       metavar="N" if isinstance(f.default, int) else "X", help=f.metadata.get("help", ""))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = WorldConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(WorldConfig)})
    progress = {"auto": None, "on": True, "off": False}[args.progress]
    print(
        f"synthetic world (seed {cfg.seed}): {cfg.n_train_entities}+{cfg.n_dev_entities} entities, "
        f"{cfg.n_train_questions}+{cfg.n_dev_questions} questions, {cfg.n_train_el}+{cfg.n_dev_el} EL sentences "
        f"-> {args.out}",
        flush=True,
    )
    try:
        summary = generate_world(cfg, args.out, progress=progress)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for split in ("train", "dev"):
        c = summary["counts"][split]
        print(
            f"{split}: {sum(c['entities'].values())} entities (+{c['namesakes']} namesakes), "
            f"questions {c['questions']}, {c['el_sentences']} EL sentences / {c['el_mentions']} mentions "
            f"({c['el_nil_mentions']} NIL)"
        )
    print(f"wrote {', '.join([*summary['files'], 'world.json'])} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
