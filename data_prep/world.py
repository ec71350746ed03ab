"""``python -m data_prep world``: the synthetic world, generated and prepared in one go.

Writes ``OUT/raw/`` (the world in HotpotQA and ELEVANT layouts, read back by the same readers as the
real benchmarks), ``OUT/tokenizer/`` (one BPE trained on all of the world's text, with the OneGen
tokens), and four prepared datasets sharing that tokenizer: ``rag_train``, ``rag_dev``, ``el_train``,
``el_dev``. Every step is skipped when its output is already complete, so a rerun is cheap.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from data_prep.mining import MiningConfig
from data_prep.prepare import PrepConfig, _mining_config_cls, corpus_texts, prepare
from data_prep.readers import read_benchmark
from data_prep.readers.elevant import read_entity_kb
from data_prep.readers.errors import ErrorPolicy
from data_prep.synthetic import WorldConfig, generate_world
from data_prep.tagging import TaggingConfig
from data_prep.tokenizer import load_tokenizer
from onegen.config import from_dict
from onegen.errors import ConfigError
from onegen.manifest import MANIFEST_NAME, atomic_write_json, sha256_json
from onegen.tokens import SpecialTokens, add_special_tokens


def _world_config_cls():
    return WorldConfig


@dataclass
class WorldPrepConfig:
    out: str = field(default="", metadata={"help": "output directory"})
    tokenizer: str = field(default="bpe:6000", metadata={"help": "bpe:N trained on the world's text (6000: every name is one token), or any tokenizer source"})
    num_proc: int = field(default=1, metadata={"help": "worker processes for each prepare"})
    shard_size: int = field(default=1000, metadata={"help": "query rows per shard"})
    tagging: TaggingConfig = field(default_factory=lambda: TaggingConfig(max_length=256, max_doc_length=96))
    tokens: SpecialTokens = field(default_factory=SpecialTokens)
    # Typed as the dataclasses (not object) so `world.*=` / `mining.*=` overrides reach their fields.
    world: WorldConfig = field(default_factory=WorldConfig, metadata={"help": "the synthetic world"})
    mining: MiningConfig = field(default_factory=MiningConfig, metadata={"help": "hard-negative mining"})

    def __post_init__(self) -> None:
        wcls = _world_config_cls()
        if self.world is None:
            self.world = wcls()
        elif isinstance(self.world, dict):
            self.world = from_dict(wcls, self.world, where="world")
        mcls = _mining_config_cls()
        if self.mining is None:
            self.mining = mcls()
        elif isinstance(self.mining, dict):
            self.mining = from_dict(mcls, self.mining, where="mining")


SPLITS = {
    "rag_train": ("2wiki", "train.json"),
    "rag_dev": ("2wiki", "dev.json"),
    "el_train": ("elevant", "el_train.jsonl"),
    "el_dev": ("elevant", "el_dev.jsonl"),
}


def _generate(cfg: WorldPrepConfig, raw: Path, log) -> None:
    stamp = raw / "world.json"
    want = sha256_json(asdict(cfg.world))
    if stamp.exists() and json.loads(stamp.read_text()).get("config_sha256") == want:
        log(f"[world] reusing the generated world in {raw}")
        return
    log(f"[world] generating the synthetic world into {raw}")
    summary = generate_world(cfg.world, raw)
    summary = dict(summary or {}, config_sha256=want)
    # world.json last: its presence with this config's hash marks the raw files complete.
    atomic_write_json(stamp, summary)


def _world_tokenizer(cfg: WorldPrepConfig, raw: Path, out: Path, log) -> Path:
    tok_dir = out / "tokenizer"
    if (tok_dir / "tokenizer_config.json").exists():
        return tok_dir
    policy = ErrorPolicy("fail")
    texts: list[str] = []
    for kind, name in SPLITS.values():
        ds = read_benchmark(kind, raw / name, policy, **({"kb_path": raw / "kb.jsonl"} if kind == "elevant" else {}))
        texts += corpus_texts(ds)
    texts += sorted(f"{d.title}: {d.text}" for d in read_entity_kb(raw / "kb.jsonl", policy).values())
    log(f"[world] training the {cfg.tokenizer} tokenizer on {len(texts)} texts")
    tokenizer = load_tokenizer(cfg.tokenizer, texts=sorted(texts))
    add_special_tokens(tokenizer, cfg.tokens)
    tmp = out / ".tokenizer.tmp"
    tokenizer.save_pretrained(str(tmp))
    tmp.rename(tok_dir)
    return tok_dir


def prepare_world(cfg: WorldPrepConfig, log=print) -> dict[str, dict]:
    if not cfg.out:
        raise ConfigError("no output directory: give --out DIR")
    out = Path(cfg.out)
    raw = out / "raw"
    _generate(cfg, raw, log)
    tok_dir = _world_tokenizer(cfg, raw, out, log)
    manifests = {}
    for split, (kind, name) in SPLITS.items():
        dest = out / split
        if (dest / MANIFEST_NAME).exists():
            log(f"[world] {split}: already prepared")
            manifests[split] = json.loads((dest / MANIFEST_NAME).read_text())
            continue
        log(f"[world] preparing {split}")
        pcfg = PrepConfig(kind=kind, input=str(raw / name), out=str(dest), tokenizer=str(tok_dir),
                          kb=str(raw / "kb.jsonl") if kind == "elevant" else None, num_proc=cfg.num_proc,
                          shard_size=cfg.shard_size, tagging=cfg.tagging, tokens=cfg.tokens, mining=cfg.mining)
        manifests[split] = prepare(pcfg, log=log)
    return manifests
