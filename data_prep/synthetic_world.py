"""The synthetic world's vocabulary, its config and its world model: entities with names, facts and paragraphs.

``data_prep.synthetic`` draws questions (``synthetic_questions``) and entity-linking sentences
(``synthetic_linking``) from a ``World`` and writes the files; see its docstring for the layouts.
Everything is a pure function of the seed (``random.Random`` streams only).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Any

from onegen.errors import ConfigError

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
