"""Train one causal LM to generate and retrieve (OneGen) under DeepSpeed ZeRO.

Launch (the same script everywhere):
    deepspeed --num_gpus 8 pipeline/train.py --config configs/qwen2-1.5b-multihop.yaml
    deepspeed --num_gpus 2 pipeline/train.py --config configs/tiny-cpu.yaml        # 2 CPU ranks (gloo)
    torchrun --nproc_per_node 2 pipeline/train.py --config configs/tiny-cpu.yaml
    python pipeline/train.py --config configs/tiny-cpu.yaml loss.mode=git output_dir=runs/git
    sbatch slurm/train.sh                                                            # multi-node

Any config field can be overridden as key=value (``--help-config`` lists them). Rerunning the same
command resumes from the latest *complete* checkpoint in ``output_dir``.

Why a custom loop around ``deepspeed.initialize`` rather than ``transformers.Trainer``: a OneGen
micro-batch is two forwards (query rows and the unique documents they need) with a loss that
all-gathers across ranks; the data position must be exact across resumes (units consumed, not
"skip N batches"); and the loop is ~150 lines. The Trainer would need its data pipeline, loss,
checkpoint naming and resume logic overridden — more code than it saves.

Imports: DeepSpeed, transformers, torch and the pipeline modules that load them are imported inside
the functions that use them (``# lazy``). DeepSpeed and transformers read environment variables at
import that ``main()`` sets first (``apply_offline_defaults``); the rest stay off ``--help``'s path too
(torch itself comes in with ``onegen.distributed``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import signal
import socket
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import yaml
from tqdm import tqdm

# Run as a script too (deepspeed pipeline/train.py): onegen and pipeline import through the editable
# install (pip install -e .), from any working directory.
import onegen.distributed as collectives
from onegen.config import dump_yaml, help_text, load_config
from onegen.errors import OneGenError
from onegen.manifest import git_commit
from onegen.mlflow_tags import TAG_MODE, TAG_MODEL, TAG_STAGE, TRAIN_STAGE
from onegen.prepared import check_tokenizer, open_prepared
from onegen.runlock import DirLock
from onegen.tokens import SpecialTokens, tokenizer_fingerprint
from pipeline.config import LoraConfig, TrainConfig
from pipeline.ds_config import fill_auto, load_ds_config, zero_stage
from pipeline.memory import memory_mb, peak_memory_mb
from pipeline.orphans import start_watchdog
from pipeline.packing import attention_width
from pipeline.plan import BatchPlan, units_per_epoch
from pipeline.tracking import Tracker, plot_curves, read_local_metrics, truncate_local_metrics

log = logging.getLogger("onegen.train")
FINAL_STATS = ("loss", "loss_gen", "loss_ret", "ret_acc")  # the summary's final losses, also kept in each checkpoint


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed() -> tuple[int, int, int]:
    """Initialise torch.distributed under any launcher, or as a single process without one."""
    # lazy: see module docstring
    import deepspeed
    import torch  # lazy: as above

    if torch.distributed.is_initialized():  # train() starts it before the output dir's lock; _set_up asks again
        return torch.distributed.get_rank(), torch.distributed.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
    if "RANK" not in os.environ:  # plain `python`: a world of one (else DeepSpeed looks for MPI)
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    if not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    return rank, world, local_rank


class StopFlag:
    """Set by SIGUSR1 (SLURM's warning before the time limit) or SIGTERM: checkpoint, then exit."""

    def __init__(self) -> None:
        self.signal: int | None = None
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._set)

    def _set(self, signum, frame) -> None:
        self.signal = signum


@dataclass
class Run:
    """What one training run holds between its set-up and its end."""

    cfg: TrainConfig
    rank: int
    world: int
    engine: Any
    model: Any
    wrapped: Any
    tokenizer: Any
    tokens: Any
    train_sets: list
    eval_sets: list
    collators: list
    plan: Any
    ds_cfg: dict
    tracker: Any = None
    step: int = 0
    units: int = 0
    resumed_from: Path | None = None
    last_stats: dict = field(default_factory=dict)
    mem_start_mb: float = 0.0  # memory_mb() when the steps began: step_mem_mb is the steps' peak above it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def out(self) -> Path:
        return Path(self.cfg.output_dir)

    @property
    def ckpt_root(self) -> Path:
        return self.out / "checkpoints"

    def collate(self, epoch: int, d_idx: int, rows: list[int]):
        return self.collators[d_idx](self.train_sets[d_idx].query_rows(rows), epoch=epoch)


def train(cfg: TrainConfig) -> dict:
    # DeepSpeed's ZeRO-3 calls deprecated c10d names on every step: not the user's concern.
    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed", category=FutureWarning)
    rank, _, local_rank = setup_distributed()
    clean = False
    try:
        with _output_lock(Path(cfg.output_dir), rank, local_rank):
            result = _train_locked(cfg)
        clean = True
        return result
    finally:
        collectives.shutdown(clean)


def _train_locked(cfg: TrainConfig) -> dict:
    run = _set_up(cfg)
    status = "FAILED"
    try:
        stopped = _loop(run)
        if stopped:
            status = "KILLED"
            return {"step": run.step, "stopped": True}
        summary = _finish(run)
        status = "FINISHED"
        return summary
    finally:
        run.tracker.end(status)


@contextlib.contextmanager
def _output_lock(out: Path, rank: int, local_rank: int) -> Iterator[None]:
    """Rank 0 holds the output dir's lock (onegen/runlock.py) for the run's life, taken before any start-up
    clean-up or resume read; every rank learns the outcome, and all exit together when it is refused."""
    # lazy: see module docstring
    import torch

    lock, failed = None, None
    if rank == 0:
        try:
            lock = DirLock(out, log=lambda m: print(m, flush=True)).acquire()
        except Exception as e:  # the other ranks must hear of any failure, or they would wait in the next collective
            failed = e
    # Built where the engine's tensors will live (NCCL takes no CPU tensor): the engine does not exist yet.
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if collectives.any_rank(failed is not None, device):
        if failed is not None:
            raise failed
        raise SystemExit(2)  # rank 0 prints why
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def _set_up(cfg: TrainConfig) -> Run:
    """Distributed start-up, data, model and engine, resume, output dir and tracker."""
    # lazy: see module docstring
    import deepspeed
    import torch  # lazy: as above
    from transformers import AutoTokenizer  # lazy: as above
    from transformers.integrations import HfDeepSpeedConfig  # lazy: as above

    # lazy: see module docstring
    from pipeline import checkpoint as ckpt
    from pipeline.collator import CollatorConfig, OneGenCollator  # lazy: as above
    from pipeline.lora import parameter_counts  # lazy: as above
    from pipeline.model import build_model, choose_dtype, model_config, model_hidden_size  # lazy: as above
    from pipeline.wrapper import OneGenTrainModule  # lazy: as above

    rank, world, _ = setup_distributed()
    if rank == 0:
        print(f"[train] {world} rank(s) started; loading data and building the model", flush=True)
    if not cfg.data.train:
        raise OneGenError("data.train is empty: give the prepared dataset dir(s), e.g. data.train=[runs/world/rag_train]")
    train_sets = [open_prepared(p) for p in cfg.data.train]
    eval_sets = [open_prepared(p) for p in cfg.data.eval]
    tokenizer = AutoTokenizer.from_pretrained(str(train_sets[0].path / "tokenizer"), local_files_only=True)
    for d in train_sets[1:] + eval_sets:
        check_tokenizer(d, tokenizer, f"the tokenizer of {train_sets[0].path}")
    tokens = SpecialTokens.from_dict(train_sets[0].manifest["config"]["tokens"])
    sizes = [len(d) for d in train_sets]
    ds_cfg = load_ds_config(cfg.deepspeed)
    if cfg.optim.epochs:
        per_epoch = units_per_epoch(sizes, cfg.optim.micro_batch_size, cfg.optim.grad_accum, world, cfg.data.train_weights)
        cfg.optim.max_steps = max(1, math.ceil(cfg.optim.epochs * per_epoch / (world * cfg.optim.grad_accum)))

    dtype = choose_dtype(cfg.model.dtype)
    ds_cfg = fill_auto(ds_cfg, micro_batch=cfg.optim.micro_batch_size,
                       grad_accum=cfg.optim.grad_accum, world_size=world, lr=cfg.optim.lr,
                       weight_decay=cfg.optim.weight_decay, warmup_steps=cfg.optim.warmup_steps,
                       total_steps=cfg.optim.max_steps, grad_clip=cfg.optim.grad_clip, bf16=dtype == torch.bfloat16,
                       hidden_size=model_hidden_size(model_config(cfg.model, tokenizer)), betas=cfg.optim.betas)
    # Kept alive for the whole run (on the Run's engine): under ZeRO-3 it makes from_config/from_pretrained
    # build the model already partitioned (and HF weight init still runs, unlike a raw zero.Init()).
    hf_ds = HfDeepSpeedConfig(ds_cfg) if zero_stage(ds_cfg) == 3 else None
    model = build_model(cfg.model, tokenizer, seed=cfg.seed, init_new_tokens=tokens)
    if rank == 0:
        print("[train] trainable parameters: {:,} of {:,}".format(*parameter_counts(model)), flush=True)
    wrapped = OneGenTrainModule(model, cfg.loss, world)
    if rank == 0:
        print("[train] starting DeepSpeed (the first run on a machine builds a communication op, ~20 s)", flush=True)
    engine, _, _, _ = deepspeed.initialize(model=wrapped, model_parameters=[p for p in wrapped.parameters() if p.requires_grad],
                                           config=ds_cfg)
    engine.onegen_hf_ds_config = hf_ds
    plan = BatchPlan(sizes, cfg.optim.micro_batch_size, cfg.optim.grad_accum, world, cfg.seed, cfg.data.train_weights)
    collators = [OneGenCollator(d.doc_rows, tokenizer.pad_token_id,
                                CollatorConfig(mode=cfg.loss.mode, num_negatives=cfg.loss.num_negatives, seed=cfg.seed,
                                               packing=cfg.data.packing, pack_tokens=cfg.data.pack_tokens,
                                               pack_attention_at=attention_width(model.onegen_attention, model.config.hidden_size,
                                                                                 model.config.intermediate_size)))
                 for d in train_sets]
    run = Run(cfg, rank, world, engine, model, wrapped, tokenizer, tokens, train_sets, eval_sets, collators, plan, ds_cfg)
    run.resumed_from = ckpt.latest_complete(run.ckpt_root)
    if run.resumed_from is not None:
        _check_resume_config(run.out, cfg)
        state = ckpt.load(engine, run.resumed_from)
        if state.get("units_per_step") not in (None, plan.per_step) and run.is_main:
            log.warning("resuming with a different world size × grad_accum; the data position is kept in units")
        run.step, run.units = int(state["step"]), int(state["units_consumed"])
        run.last_stats = _saved_stats(state, run.out, run.step)
    _prepare_output(run)
    return run


def _prepare_output(run: Run) -> None:
    """Rank 0 cleans and writes the output dir (the others wait), then the tracker starts."""
    # lazy: see module docstring
    import torch.distributed as dist

    from pipeline import checkpoint as ckpt  # lazy: as above

    cfg, out = run.cfg, run.out
    if run.is_main:
        out.mkdir(parents=True, exist_ok=True)
        # Steps after the resumed checkpoint are redone: drop their rows (and half-written checkpoints)
        # so metrics.jsonl ends with each step once and no stale file leaks into a new save.
        truncate_local_metrics(out, run.step)
        ckpt.remove_incomplete(run.ckpt_root)
        (out / "config.yaml").write_text(dump_yaml(cfg))
        (out / "ds_config.json").write_text(json.dumps(run.ds_cfg, indent=2))
    dist.barrier()  # no rank saves before rank 0 has cleaned up
    run.tracker = Tracker(out, enabled=run.is_main, tracking_uri=cfg.mlflow_tracking_uri, experiment=cfg.mlflow_experiment,
                          run_name=cfg.run_name or f"train-{cfg.loss.mode}-{cfg.model.source}",
                          tags={TAG_STAGE: TRAIN_STAGE, TAG_MODE: cfg.loss.mode, TAG_MODEL: cfg.model.source})
    if not run.is_main:
        return
    if run.resumed_from is None:
        run.tracker.log_params({"config": asdict(cfg), "deepspeed": run.ds_cfg, "world_size": run.world,
                                "data_fingerprints": [d.fingerprint for d in run.train_sets], "git_commit": git_commit(),
                                "attention": run.model.onegen_attention, "attention_why": run.model.onegen_attention_why,
                                "dtype": str(run.model.dtype)})
        run.tracker.log_artifact(out / "config.yaml")
        run.tracker.log_artifact(out / "ds_config.json")
    print(f"[train] {cfg.loss.mode} · {cfg.model.source} · {run.world} rank(s) · ZeRO-{zero_stage(run.ds_cfg)} · "
          f"{run.model.onegen_attention} ({run.model.onegen_attention_why}) · "
          f"{sum(len(d) for d in run.train_sets)} rows · {cfg.optim.max_steps} steps"
          + (f" ({cfg.optim.epochs:g} epochs)" if cfg.optim.epochs else "")
          + (f" · resuming from {run.resumed_from.name}" if run.resumed_from else "")
          + (" · nothing left to train" if run.step >= cfg.optim.max_steps else ""), flush=True)


def _loop(run: Run) -> bool:
    """Train to ``max_steps``; True when a signal stopped the run (after a checkpoint)."""
    # lazy: see module docstring
    from pipeline import checkpoint as ckpt
    from pipeline.step import accumulate  # lazy: as above

    cfg, engine = run.cfg, run.engine
    flag = StopFlag()
    bar = tqdm(total=cfg.optim.max_steps, initial=run.step, disable=not run.is_main, desc="train", unit="step",
               dynamic_ncols=True)
    try:
        engine.train()
        run.mem_start_mb = memory_mb(reset_peak=True)
        while run.step < cfg.optim.max_steps:
            t0 = time.time()
            stats, n_tokens = accumulate(engine, lambda: run.wrapped.last_stats, run.plan.step_units(run.units, run.rank),
                                         run.collate, run.wrapped.loss_cfg, engine.device)
            run.units += run.plan.per_step
            run.step += 1
            metrics = _step_metrics(run, stats, n_tokens, time.time() - t0)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", gen=f"{metrics['loss_gen']:.3f}",
                            ret=f"{metrics['loss_ret']:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
            bar.update()
            if run.eval_sets and cfg.eval_every and run.step % cfg.eval_every == 0 and run.step < cfg.optim.max_steps:
                _evaluate(run)
            stop = collectives.any_rank(flag.signal is not None, engine.device)
            if (cfg.checkpoint_every and run.step % cfg.checkpoint_every == 0) or stop or run.step == cfg.optim.max_steps:
                ckpt.save(engine, run.ckpt_root, run.step, _client_state(run), cfg.keep_checkpoints)
            if stop:
                if run.is_main:
                    print(f"\n[train] signal {flag.signal}: checkpoint {ckpt.tag_for(run.step)} written; rerun to resume",
                          flush=True)
                return True
        return False
    finally:
        bar.close()  # an error message then starts on its own line, not after the progress bar


def _client_state(run: Run) -> dict:
    """What a checkpoint holds besides DeepSpeed's state: the data position, and the last step's losses
    (a rerun with nothing left to train prints them)."""
    return {"step": run.step, "units_consumed": run.units, "units_per_step": run.plan.per_step,
            "stats": {k: float(run.last_stats[k]) for k in FINAL_STATS if k in run.last_stats}}


def _step_metrics(run: Run, stats: dict, n_tokens: float, seconds: float) -> dict:
    metrics = {k: stats[k] for k in ("loss", "loss_gen", "loss_ret", "ret_acc", "pad_frac") if k in stats}
    metrics.update(lr=run.engine.get_lr()[0], tokens_per_s=n_tokens / seconds, step_s=seconds,
                   epoch=run.units / run.plan.units_per_epoch, peak_mem_mb=peak_memory_mb())
    metrics["step_mem_mb"] = metrics["peak_mem_mb"] - run.mem_start_mb  # activations and gradients, mostly
    gn = run.engine.get_global_grad_norm()
    if gn is not None:
        metrics["grad_norm"] = float(gn)
    run.last_stats = stats
    if run.is_main and run.step % run.cfg.log_every == 0:
        run.tracker.log_metrics(metrics, run.step)
    return metrics


def _finish(run: Run) -> dict:
    """Final evaluation, export, curves and summary."""
    # lazy: see module docstring
    from pipeline import checkpoint as ckpt
    from pipeline.export import export_model  # lazy: as above

    cfg, out, stats = run.cfg, run.out, run.last_stats
    final_eval = _evaluate(run) if run.eval_sets else {}
    export_dir = None
    if cfg.export:
        export_dir = export_model(run.engine, run.model, run.tokenizer, out / "model", cfg=cfg, tokens=run.tokens,
                                  data=run.train_sets, tokenizer_fp=tokenizer_fingerprint(run.tokenizer), step=run.step,
                                  run_id=run.tracker.run_id, zero3=zero_stage(run.ds_cfg) == 3)
    if not run.is_main:
        return {"step": run.step}
    curves = plot_curves(out)
    if curves:
        run.tracker.log_artifact(curves)
    summary = {"step": run.step, "output_dir": str(out), "checkpoint": str(ckpt.latest_complete(run.ckpt_root)),
               "model": str(export_dir) if export_dir else None, "mlflow_run_id": run.tracker.run_id,
               "final": {k: stats.get(k) for k in FINAL_STATS}, "eval": final_eval}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"[train] done: step {run.step}; loss {stats.get('loss', float('nan')):.4f} (gen {stats.get('loss_gen', 0):.4f}, "
          f"ret {stats.get('loss_ret', 0):.4f}); " + " ".join(f"{k}={v:.3f}" for k, v in final_eval.items()))
    print(f"[train] model: {export_dir}  checkpoints: {run.ckpt_root}  MLflow run: {run.tracker.run_id} "
          f"({run.tracker.uri if run.tracker.enabled else '-'})", flush=True)
    return summary


def _saved_stats(state: dict, out: Path, step: int) -> dict:
    """The last step's losses of a resumed checkpoint (older checkpoints: its row of metrics.jsonl)."""
    if state.get("stats"):
        return dict(state["stats"])
    try:
        rows = [r for r in read_local_metrics(out) if r.get("step") == step]
    except (OSError, ValueError):
        rows = []
    return {k: rows[-1][k] for k in FINAL_STATS if rows and k in rows[-1]}


def _check_resume_config(out: Path, cfg: TrainConfig) -> None:
    """A checkpoint only fits the model it was written by: refuse a changed model/mode clearly
    (DeepSpeed would fail later with a bare tensor-shape error)."""
    saved_path = out / "config.yaml"
    if not saved_path.exists():
        return
    saved = yaml.safe_load(saved_path.read_text()) or {}
    now = asdict(cfg)
    # Flat "lora.r" keys; a run from before model.lora existed trained without it (the defaults).
    flat = lambda m: {**{k: v for k, v in m.items() if k != "lora"},  # noqa: E731
                      **{f"lora.{k}": v for k, v in (m.get("lora") or asdict(LoraConfig())).items()}}
    old, new = flat(saved.get("model", {})), flat(now["model"])
    free = ("gradient_checkpointing", "attn_implementation", "allow_network", "lora.export_adapter", "lora.dropout")
    changed = [f"model.{k}" for k in new if old.get(k) != new[k] and k not in free]
    if saved.get("loss", {}).get("mode") != now["loss"]["mode"]:
        changed.append("loss.mode")
    if (saved.get("data", {}).get("train_weights") or []) != now["data"]["train_weights"]:
        changed.append("data.train_weights")  # the data position (units consumed) means another order
    if changed:
        raise OneGenError(f"{out} holds checkpoints of another configuration (changed: {', '.join(changed)}); "
                          f"resume with the original settings or use a new output_dir")


def _evaluate(run: Run) -> dict:
    """Teacher-forced retrieval accuracy on each eval set (every rank runs it: ZeRO-3 forwards are collective)."""
    # lazy: see module docstring
    from pipeline.teacher_forced import retrieval_accuracy

    cfg, results = run.cfg, {}
    for d in run.eval_sets:
        r = retrieval_accuracy(run.model, d, run.tokenizer.pad_token_id, max_rows=cfg.data.eval_max_rows,
                               max_candidates=cfg.data.eval_max_candidates, seed=cfg.seed)
        at = f"@{r['candidates']}" if r["sampled"] else ""  # a sampled KB is not the whole KB: say so in the name
        results[f"eval/{d.path.name}/retrieval_acc{at}"] = r["retrieval_acc"]
        results[f"eval/{d.path.name}/retrieval_mrr{at}"] = r["retrieval_mrr"]
    if len(run.eval_sets) == 1:
        key = next(k for k in results if "/retrieval_acc" in k)
        results["eval/retrieval_acc" + key[key.index("retrieval_acc") + len("retrieval_acc"):]] = results[key]
    run.tracker.log_metrics(results, run.step)
    return results


def main(argv: list[str] | None = None) -> int:
    from onegen.environment import apply_offline_defaults  # here, not at the top: main() is this script's to change

    # Before DeepSpeed is imported and builds its ops (into the checkout's cache, not ~/.cache) and
    # before transformers reads the hub variables; torch, imported above, reads none of them.
    apply_offline_defaults()
    parser = argparse.ArgumentParser(prog="pipeline/train.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--config", help="YAML recipe (configs/*.yaml)")
    parser.add_argument("--help-config", action="store_true", help="list every config field and exit")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. loss.mode=git optim.max_steps=100")
    ns = parser.parse_args(argv)
    if ns.help_config:
        print(help_text(TrainConfig))
        return 0
    start_watchdog()  # first thing: a launcher can die while DeepSpeed is still being imported
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    try:
        cfg = load_config(TrainConfig, ns.config, ns.overrides)
        train(cfg)
    except OneGenError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
