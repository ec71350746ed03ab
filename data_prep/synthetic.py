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

This module is the driver and the CLI; the world model (vocabulary, ``WorldConfig``, ``World``) is
``synthetic_world``, the questions ``synthetic_questions``, the EL sentences ``synthetic_linking``.

Usage::

    python -m data_prep.synthetic --out data/synthetic --seed 0 --train-questions 2000
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import random
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

from tqdm import tqdm

from onegen.errors import ConfigError
from onegen.manifest import atomic_write_bytes

# The world model, its questions and its entity-linking sentences live in modules of their own; their
# public names stay importable from here.
from data_prep.synthetic_linking import LinkingMaker
from data_prep.synthetic_questions import QuestionMaker
from data_prep.synthetic_world import (
    ATTRS, BRIDGE_TEMPLATE, CITY, CODAS, COLORS, COMPANY, COMPARISONS, CONSONANTS, COUNTRY_SUFFIXES, EL_FRAMES,
    KIND_SHARE, KIND_TYPE, KINDS, N_COUNTRIES, NIL_ID, OCCUPATIONS, PERSON, PRODUCTS, RELATIONS, SPORTS,
    SYLLABLES, VOWELS, Entity, NameGenerator, World, WorldConfig,
)

__all__ = [
    "ATTRS", "BRIDGE_TEMPLATE", "CITY", "CODAS", "COLORS", "COMPANY", "COMPARISONS", "CONSONANTS", "COUNTRY_SUFFIXES",
    "EL_FRAMES", "KIND_SHARE", "KIND_TYPE", "KINDS", "N_COUNTRIES", "NIL_ID", "OCCUPATIONS", "PERSON", "PRODUCTS",
    "RELATIONS", "SPORTS", "SYLLABLES", "VOWELS", "Entity", "NameGenerator", "World", "WorldConfig",
    "QuestionMaker", "LinkingMaker", "PROGRESS_MIN_UNITS", "generate_world", "build_parser", "main",
]

# Progress bars only when generation would take more than a few seconds (~20k questions/s here).
PROGRESS_MIN_UNITS = 100_000


# ---------------------------------------------------------------------------------------------
# Driver


def _progress(it: Iterable, total: int, desc: str, enabled: bool) -> Iterable:
    if not enabled:
        return it
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
