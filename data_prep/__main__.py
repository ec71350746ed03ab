"""Offline data preparation for OneGen.

Commands:
  prepare     read a benchmark file, tag token roles, mine hard negatives, write Arrow shards
  synthetic   write the synthetic multi-hop world (HotpotQA + ELEVANT layouts) for the quickstart
  world       synthetic + prepare its four splits (rag/el × train/dev) with one shared tokenizer
  inspect     show prepared rows with each token's role and each RET's positive/negatives

Examples:
  python -m data_prep prepare --kind hotpotqa --input ../shared/data/hotpotqa/hipporag_hotpot_train_distractor100.json \\
      --out runs/hotpot --tokenizer smollm2 --num-proc 2
  python -m data_prep prepare --kind 2wiki --input dev.json.gz --out runs/2wiki tagging.max_length=1024
  python -m data_prep prepare --kind hotpotqa --input train.json --out runs/hp_heldout --tokenizer smollm2 \\
      holdout.part=heldout holdout.fraction=0.2 holdout.seed=0     # and holdout.part=train: disjoint questions
  python -m data_prep world --out runs/world --train-questions 2000
  python -m data_prep prepare ... --only-shards 0/4     # job-array task 0 of 4 (slurm/prep.sh), then:
  python -m data_prep prepare ... --finish-only         # the manifest, once every task is done
  python -m data_prep inspect runs/world/rag_train -n 2

Any field of the config can be set as key=value after the flags (e.g. mining.dense=true
mining.rank_window=[3,30] tagging.max_length=768); `python -m data_prep prepare --help-config`
lists them all.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

# None of these imports torch, transformers or huggingface_hub (main() sets the offline variables
# they read first); the heaviest is pyarrow, for `--help` too.
from data_prep import synthetic
from data_prep.inspect_cmd import inspect
from data_prep.prepare import PrepConfig, parse_only_shards, prepare
from data_prep.world import WorldPrepConfig, prepare_world
from onegen.config import help_text, load_config
from onegen.config_flags import add_config_flags, flag_overrides
from onegen.environment import allow_network, apply_offline_defaults
from onegen.errors import ConfigError, run_cli
from onegen.runlock import DirLock


def _prepare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML recipe with PrepConfig fields")
    add_config_flags(p, PrepConfig)  # one flag per top-level field: --kind, --input, --out, --tokenizer, ...
    p.add_argument("--help-config", action="store_true", help="list every config field and exit")
    p.add_argument("--only-shards", metavar="I/N", help="job-array task I of N (0-based): write only the query and "
                                                       "doc shards whose index is I mod N, and no manifest (slurm/prep.sh)")
    p.add_argument("--finish-only", action="store_true", help="after every --only-shards task: check all shards exist, "
                                                              "then write quarantine.jsonl + manifest.json")
    p.add_argument("overrides", nargs="*", help="key=value overrides of config fields")


def cmd_prepare(ns: argparse.Namespace) -> int:
    if ns.help_config:
        print(help_text(PrepConfig))
        return 0
    cfg = load_config(PrepConfig, ns.config, flag_overrides(ns, PrepConfig) + list(ns.overrides))
    if ns.only_shards and ns.finish_only:
        raise ConfigError("--only-shards and --finish-only are separate steps: give one of them")
    if cfg.allow_network:  # e.g. `allow_network: true` in the recipe; nothing has imported huggingface_hub yet
        allow_network()
    # One writer per output dir, except the job-array tasks of --only-shards: they share it by design
    # (each writes only its own shards); --finish-only takes it again.
    with _dir_lock(cfg.out if not ns.only_shards else ""):
        prepare(cfg, only_shards=parse_only_shards(ns.only_shards) if ns.only_shards else None,
                finish_only=ns.finish_only)
    return 0


def _dir_lock(out: str) -> contextlib.AbstractContextManager:
    """The output dir's lock (onegen/runlock.py): a second run on it refuses while this one writes."""
    return DirLock(out) if out else contextlib.nullcontext()


def cmd_inspect(ns: argparse.Namespace) -> int:
    inspect(ns.dir, n=ns.n, start=ns.start)
    return 0


def cmd_synthetic(ns: argparse.Namespace, rest: list[str]) -> int:
    return synthetic.main(rest) or 0


def cmd_world(ns: argparse.Namespace) -> int:
    if ns.help_config:
        print(help_text(WorldPrepConfig))
        return 0
    overrides = flag_overrides(ns, WorldPrepConfig)  # --out, --tokenizer, --num-proc, --shard-size
    for flag, key in (("train_questions", "world.n_train_questions"), ("dev_questions", "world.n_dev_questions")):
        if getattr(ns, flag) is not None:
            overrides.append(f"{key}={getattr(ns, flag)}")
    cfg = load_config(WorldPrepConfig, ns.config, overrides + list(ns.overrides))
    if not cfg.out:
        raise ConfigError("world: give the output directory (--out DIR, or out: in the recipe)")
    with _dir_lock(cfg.out):
        prepare_world(cfg)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Before anything imports huggingface_hub/torch (they read these once); --allow-network keeps the hub.
    apply_offline_defaults(network="--allow-network" in argv or "allow_network=true" in argv)
    parser = argparse.ArgumentParser(prog="python -m data_prep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    sub = parser.add_subparsers(dest="cmd", required=True)
    _prepare_args(sub.add_parser("prepare", help="prepare one benchmark file", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False))
    pi = sub.add_parser("inspect", help="show prepared rows with roles and negatives", allow_abbrev=False)
    pi.add_argument("dir")
    pi.add_argument("-n", type=int, default=3, help="how many query rows")
    pi.add_argument("--start", type=int, default=0)
    sub.add_parser("synthetic", help="write the synthetic world's raw files (see: synthetic --help)", add_help=False,
                   allow_abbrev=False)
    pw = sub.add_parser("world", help="generate the synthetic world and prepare its four splits", allow_abbrev=False)
    pw.add_argument("--config", help="YAML recipe with WorldPrepConfig fields")
    add_config_flags(pw, WorldPrepConfig)  # one flag per top-level field: --out, --tokenizer, --num-proc, ...
    pw.add_argument("--train-questions", type=int, help="train questions (= world.n_train_questions)")
    pw.add_argument("--dev-questions", type=int, help="dev questions (= world.n_dev_questions)")
    pw.add_argument("--help-config", action="store_true", help="list every config field and exit")
    pw.add_argument("overrides", nargs="*", help="key=value (world.*, tagging.*, mining.*)")

    if argv and argv[0] == "synthetic":
        return cmd_synthetic(argparse.Namespace(), argv[1:])
    ns = parser.parse_args(argv)
    command = {"prepare": cmd_prepare, "inspect": cmd_inspect, "world": cmd_world}[ns.cmd]
    return run_cli(lambda: command(ns), interrupted="finished shards are kept; rerun the same command to resume")


if __name__ == "__main__":
    sys.exit(main())
