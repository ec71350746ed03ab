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
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path

if __package__ in (None, ""):  # run as a script (deepspeed pipeline/train.py): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from onegen.config import dump_yaml, help_text, load_config  # noqa: E402
from onegen.errors import OneGenError  # noqa: E402
from pipeline.config import TrainConfig  # noqa: E402

log = logging.getLogger("onegen.train")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed() -> tuple[int, int, int]:
    """Initialise torch.distributed under any launcher, or as a single process without one."""
    import deepspeed
    import torch

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


def peak_memory_mb() -> float:
    """Peak accelerator memory on GPU; peak resident memory of this process on CPU."""
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class StopFlag:
    """Set by SIGUSR1 (SLURM's warning before the time limit) or SIGTERM: checkpoint, then exit."""

    def __init__(self) -> None:
        self.signal: int | None = None
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._set)

    def _set(self, signum, frame) -> None:
        self.signal = signum


def _sync_flag(flag: StopFlag) -> bool:
    """Every rank must agree to stop at the same step (a signal may reach only some)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag.signal else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def train(cfg: TrainConfig) -> dict:
    import deepspeed
    import torch
    import torch.distributed as dist
    from tqdm import tqdm
    from transformers import AutoTokenizer
    from transformers.integrations import HfDeepSpeedConfig

    from data_prep.tokenizer import tokenizer_fingerprint
    from onegen.manifest import git_commit
    from onegen.tokens import SpecialTokens
    from pipeline import checkpoint as ckpt
    from pipeline.collator import CollatorConfig, OneGenCollator
    from pipeline.data import check_tokenizer, open_prepared
    from pipeline.ds_config import fill_auto, load_ds_config, zero_stage
    from pipeline.export import export_model
    from pipeline.loss import JointLossConfig
    from pipeline.model import build_model, choose_dtype
    from pipeline.plan import BatchPlan
    from pipeline.teacher_forced import retrieval_accuracy
    from pipeline.tracking import Tracker, plot_curves, truncate_local_metrics
    from pipeline.wrapper import OneGenTrainModule

    # DeepSpeed's ZeRO-3 calls deprecated c10d names on every step: not the user's concern.
    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed", category=FutureWarning)
    rank, world, _ = setup_distributed()
    is_main = rank == 0
    out = Path(cfg.output_dir)
    if not cfg.data.train:
        raise OneGenError("data.train is empty: give the prepared dataset dir(s), e.g. data.train=[runs/world/rag_train]")
    train_sets = [open_prepared(p) for p in cfg.data.train]
    eval_sets = [open_prepared(p) for p in cfg.data.eval]
    tok_dir = train_sets[0].path / "tokenizer"
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    for d in train_sets[1:] + eval_sets:
        check_tokenizer(d, tokenizer, f"the tokenizer of {train_sets[0].path}")
    tokens = SpecialTokens.from_dict(train_sets[0].manifest["config"]["tokens"])

    ds_cfg = load_ds_config(cfg.deepspeed)
    dtype = choose_dtype(cfg.model.dtype)
    hidden = cfg.model.hidden_size
    ds_cfg = fill_auto(ds_cfg, micro_batch=cfg.optim.micro_batch_size, grad_accum=cfg.optim.grad_accum,
                       world_size=world, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                       warmup_steps=cfg.optim.warmup_steps, total_steps=cfg.optim.max_steps,
                       grad_clip=cfg.optim.grad_clip, bf16=dtype == torch.bfloat16, hidden_size=hidden)
    # Kept alive for the whole run: under ZeRO-3 it makes from_config/from_pretrained build the
    # model already partitioned (and HF weight init still runs, unlike a raw zero.Init()).
    hf_ds = HfDeepSpeedConfig(ds_cfg) if zero_stage(ds_cfg) == 3 else None  # noqa: F841
    model = build_model(cfg.model, tokenizer, seed=cfg.seed, init_new_tokens=tokens)
    joint = JointLossConfig(mode=cfg.loss.mode, lambda_gen=cfg.loss.lambda_gen, lambda_ret=cfg.loss.lambda_ret,
                            ret_loss=cfg.loss.ret_loss, temperature=cfg.loss.temperature)
    wrapped = OneGenTrainModule(model, joint, world)
    engine, _, _, _ = deepspeed.initialize(model=wrapped, model_parameters=[p for p in wrapped.parameters() if p.requires_grad],
                                           config=ds_cfg)
    device = engine.device
    collators = [OneGenCollator(d.doc_rows, tokenizer.pad_token_id,
                                CollatorConfig(mode=cfg.loss.mode, num_negatives=cfg.loss.num_negatives, seed=cfg.seed))
                 for d in train_sets]
    plan = BatchPlan([len(d) for d in train_sets], cfg.optim.micro_batch_size, cfg.optim.grad_accum, world, cfg.seed)

    step, units = 0, 0
    ckpt_root = out / "checkpoints"
    resume_from = ckpt.latest_complete(ckpt_root)
    if resume_from is not None:
        _check_resume_config(out, cfg)
        state = ckpt.load(engine, resume_from)
        if state.get("units_per_step") not in (None, plan.per_step) and is_main:
            log.warning("resuming with a different world size × grad_accum; the data position is kept in units")
        step, units = int(state["step"]), int(state["units_consumed"])
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        # Steps after the resumed checkpoint are redone: drop their rows (and half-written checkpoints)
        # so metrics.jsonl ends with each step once and no stale file leaks into a new save.
        truncate_local_metrics(out, step)
        ckpt.remove_incomplete(ckpt_root)
        (out / "config.yaml").write_text(dump_yaml(cfg))
        (out / "ds_config.json").write_text(json.dumps(ds_cfg, indent=2))
    dist.barrier()  # no rank saves before rank 0 has cleaned up
    tracker = Tracker(out, enabled=is_main, tracking_uri=cfg.mlflow_tracking_uri, experiment=cfg.mlflow_experiment,
                      run_name=cfg.run_name or f"train-{cfg.loss.mode}-{cfg.model.source}",
                      tags={"onegen.stage": "train", "onegen.mode": cfg.loss.mode, "onegen.model": cfg.model.source})
    if is_main:
        if resume_from is None:
            tracker.log_params({"config": asdict(cfg), "deepspeed": ds_cfg, "world_size": world,
                                "data_fingerprints": [d.fingerprint for d in train_sets], "git_commit": git_commit(),
                                "attention": model.onegen_attention, "dtype": str(dtype)})
            tracker.log_artifact(out / "config.yaml")
            tracker.log_artifact(out / "ds_config.json")
        print(f"[train] {cfg.loss.mode} · {cfg.model.source} · {world} rank(s) · ZeRO-{zero_stage(ds_cfg)} · "
              f"{sum(len(d) for d in train_sets)} rows · {cfg.optim.max_steps} steps"
              + (f" · resuming from {resume_from.name}" if resume_from else ""), flush=True)

    flag = StopFlag()
    status = "FAILED"
    stats: dict = {}
    bar = None
    try:
        bar = tqdm(total=cfg.optim.max_steps, initial=step, disable=not is_main, desc="train", unit="step",
                   dynamic_ncols=True)
        engine.train()
        while step < cfg.optim.max_steps:
            t0 = time.time()
            n_tokens = 0
            for epoch, d_idx, rows_idx in plan.step_units(units, rank):
                batch = collators[d_idx](train_sets[d_idx].query_rows(rows_idx), epoch=epoch).to(device)
                n_tokens += batch.num_tokens()
                loss = engine(batch)
                stats = wrapped.last_stats
                engine.backward(loss)
                engine.step()
            units += plan.per_step
            step += 1
            tok = torch.tensor([float(n_tokens)])
            dist.all_reduce(tok)
            dt = time.time() - t0
            metrics = {"loss": stats["loss"], "loss_gen": stats["loss_gen"], "loss_ret": stats["loss_ret"],
                       "ret_acc": stats["ret_acc"], "lr": engine.get_lr()[0], "tokens_per_s": tok.item() / dt, "step_s": dt,
                       "epoch": units / plan.units_per_epoch}
            metrics["peak_mem_mb"] = peak_memory_mb()
            gn = engine.get_global_grad_norm()
            if gn is not None:
                metrics["grad_norm"] = float(gn)
            if is_main and step % cfg.log_every == 0:
                tracker.log_metrics(metrics, step)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", gen=f"{metrics['loss_gen']:.3f}",
                            ret=f"{metrics['loss_ret']:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
            bar.update()
            if eval_sets and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.optim.max_steps:
                _evaluate(model, eval_sets, tokenizer, cfg, tracker, step, retrieval_accuracy)
            stop = _sync_flag(flag)
            if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or stop or step == cfg.optim.max_steps:
                ckpt.save(engine, ckpt_root, step, {"step": step, "units_consumed": units,
                                                    "units_per_step": plan.per_step}, cfg.keep_checkpoints)
            if stop:
                if is_main:
                    print(f"\n[train] signal {flag.signal}: checkpoint {ckpt.tag_for(step)} written; rerun to resume",
                          flush=True)
                status = "KILLED"
                return {"step": step, "stopped": True}
        bar.close()
        final_eval = _evaluate(model, eval_sets, tokenizer, cfg, tracker, step, retrieval_accuracy) if eval_sets else {}
        export_dir = None
        if cfg.export:
            export_dir = export_model(engine, model, tokenizer, out / "model", cfg=cfg, tokens=tokens,
                                      data=train_sets, tokenizer_fp=tokenizer_fingerprint(tokenizer), step=step,
                                      run_id=tracker.run_id, zero3=zero_stage(ds_cfg) == 3)
        status = "FINISHED"
        if is_main:
            curves = plot_curves(out)
            if curves:
                tracker.log_artifact(curves)
            summary = {"step": step, "output_dir": str(out), "checkpoint": str(ckpt.latest_complete(ckpt_root)),
                       "model": str(export_dir) if export_dir else None, "mlflow_run_id": tracker.run_id,
                       "final": {k: stats.get(k) for k in ("loss", "loss_gen", "loss_ret", "ret_acc")}, "eval": final_eval}
            (out / "summary.json").write_text(json.dumps(summary, indent=2))
            print(f"[train] done: step {step}; loss {stats.get('loss', float('nan')):.4f} (gen {stats.get('loss_gen', 0):.4f}, "
                  f"ret {stats.get('loss_ret', 0):.4f}); " + " ".join(f"{k}={v:.3f}" for k, v in final_eval.items()))
            print(f"[train] model: {export_dir}  checkpoints: {ckpt_root}  MLflow run: {tracker.run_id} "
                  f"({tracker.uri if tracker.enabled else '-'})", flush=True)
            return summary
        return {"step": step}
    finally:
        if bar is not None:
            bar.close()  # an error message then starts on its own line, not after the progress bar
        tracker.end(status)


def _check_resume_config(out: Path, cfg: TrainConfig) -> None:
    """A checkpoint only fits the model it was written by: refuse a changed model/mode clearly
    (DeepSpeed would fail later with a bare tensor-shape error)."""
    import yaml

    saved_path = out / "config.yaml"
    if not saved_path.exists():
        return
    saved = yaml.safe_load(saved_path.read_text()) or {}
    now = asdict(cfg)
    changed = [f"model.{k}" for k in now["model"] if saved.get("model", {}).get(k) != now["model"][k]
               and k not in ("gradient_checkpointing", "attn_implementation", "allow_network")]
    if saved.get("loss", {}).get("mode") != now["loss"]["mode"]:
        changed.append("loss.mode")
    if changed:
        raise OneGenError(f"{out} holds checkpoints of another configuration (changed: {', '.join(changed)}); "
                          f"resume with the original settings or use a new output_dir")


def _evaluate(model, eval_sets, tokenizer, cfg, tracker, step, retrieval_accuracy) -> dict:
    results = {}
    for d in eval_sets:
        name = d.path.name
        r = retrieval_accuracy(model, d, tokenizer.pad_token_id, max_rows=cfg.data.eval_max_rows)
        results[f"eval/{name}/retrieval_acc"] = r["retrieval_acc"]
        results[f"eval/{name}/retrieval_mrr"] = r["retrieval_mrr"]
    if len(eval_sets) == 1:
        results["eval/retrieval_acc"] = next(v for k, v in results.items() if k.endswith("retrieval_acc"))
    tracker.log_metrics(results, step)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pipeline/train.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML recipe (configs/*.yaml)")
    parser.add_argument("--help-config", action="store_true", help="list every config field and exit")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. loss.mode=git optim.max_steps=100")
    ns = parser.parse_args(argv)
    if ns.help_config:
        print(help_text(TrainConfig))
        return 0
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
