"""Stages of a multi-step job (the quickstart, the benchmark) and when a finished one is reused.

Each stage runs one command as a subprocess (its output teed to a log, stage summaries and progress
bars shown) and records the options it ran with (``quickstart_stage.json`` next to its output: its
command, the options, the fingerprints of its inputs' manifests). A rerun reuses a finished stage
whose options are the same ("done before, same options"), reruns one whose options changed (and
every stage downstream of it), and refuses to replace a kept output (a trained model): such a stage
asked for other options stops with the reason and the fix, before anything is deleted.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from onegen.environment import apply_offline_defaults

ROOT = Path(__file__).resolve().parent.parent


def stage_env() -> dict:
    env = dict(os.environ)
    apply_offline_defaults(env)
    env["PYTHONUNBUFFERED"] = "1"
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def run_command(cmd: list[str], log_path: Path, title: str) -> None:
    """Run a stage, teeing its output to a log; on failure show the log's tail and stop."""
    print(f"\n==> {title}\n    $ {' '.join(cmd)}", flush=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    tty = sys.stdout.isatty()
    last_bar, bar_open = 0.0, False
    with open(log_path, "w", buffering=1) as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=stage_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:  # text mode: a progress bar's "\r" updates arrive as lines too
            log.write(line)
            text = line.rstrip("\n")
            if _worth_showing(line):  # whole: a cut line lost the beginning of its model path
                sys.stdout.write(("\n" if bar_open else "") + "    " + text + "\n")
                bar_open = False
            elif _is_progress(text) and time.time() - last_bar >= (1.0 if tty else PROGRESS_EVERY_S):
                # long stages (SmolLM2 training: minutes per bar) show their bar: in place on a
                # terminal, one line every PROGRESS_EVERY_S seconds in a log
                sys.stdout.write(("\r    " + text.strip()[-150:]) if tty else ("    " + text.strip()[-150:] + "\n"))
                last_bar, bar_open = time.time(), tty
            sys.stdout.flush()
        rc = proc.wait()
    if bar_open:
        sys.stdout.write("\n")
    if rc != 0:
        tail = log_path.read_text().splitlines()[-40:]
        raise SystemExit(f"stage '{title}' failed (exit {rc}); last lines of {log_path}:\n" + "\n".join(tail))
    print(f"    ({time.time() - t0:.0f} s, log: {log_path})", flush=True)


PROGRESS_EVERY_S = 60.0
_BAR = re.compile(r"^\s*[^|:]{1,80}:\s+\d+%\|")  # a tqdm bar: "train:  40%|████  | 24/60 [...]"


def _is_progress(text: str) -> bool:
    return bool(_BAR.match(text)) and not text.lstrip().startswith("Loading")  # transformers' weight loading


def _worth_showing(line: str) -> bool:
    """Stage summaries, not library chatter (the full output is in the log)."""
    return line.startswith(("[prep]", "[world]", "[train]", "[eval]", "[index]", "error")) or "| " in line[:4]


def torchrun(ranks: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]


# ---- stages and their reuse -----------------------------------------------------------------------

STAGE_RECORD = "quickstart_stage.json"


@dataclass
class Stage:
    """One step of the quickstart and what decides whether its finished output can be reused."""
    name: str  # world, train-onegen, eval-onegen, compare, ...
    title: str  # the console's heading
    cmd: list[str]
    out: Path  # what the stage writes: a directory (removed before a rerun with other options) or a file
    done: list[Path]  # exist once it has finished
    inputs: list[Path] = field(default_factory=list)  # other stages' output dirs it reads (manifest fingerprints)
    options: dict = field(default_factory=dict)  # the user's options that shape it, by flag: {"--steps": 300}
    keep: bool = False  # other options refuse instead of replacing the output (a trained model)
    file: bool = False  # ``out`` is a file (its record lies beside it, it is overwritten, not removed)

    @property
    def record(self) -> Path:
        return self.out.parent / f"{self.name}.{STAGE_RECORD}" if self.file else self.out / STAGE_RECORD


def _fingerprint(d: Path) -> str | None:
    """A stage output's identity: its manifest's content fingerprint (None while it has none)."""
    try:
        man = json.loads((d / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return str(man.get("fingerprint") or man)


class _Paths:
    """The command line minus the paths that do not matter (where --out, the checkout and python are)."""

    def __init__(self, out: Path):
        # python first: it lies in the checkout
        self.subs = [(sys.executable, "python"), (str(out), "<out>"), (str(ROOT), "<repo>")]

    def __call__(self, text: str) -> str:
        for path, name in self.subs:
            text = text.replace(path, name)
        return text


def _current(st: Stage, rel: _Paths) -> dict:
    return {"stage": st.name, "options": st.options, "command": [rel(c) for c in st.cmd],
            "inputs": {rel(str(i)): _fingerprint(i) for i in st.inputs}}


def _read_record(st: Stage) -> dict | None:
    try:
        return json.loads(st.record.read_text())
    except (OSError, ValueError):
        return None


def _same(rec: dict | None, cur: dict) -> bool:
    return rec is not None and all(rec.get(k) == cur[k] for k in ("options", "command", "inputs"))


def _flag(k: str, v) -> str:
    return k if v is True else f"no {k}" if v is False else f"{k} {v}"


def _why_changed(st: Stage, rec: dict | None, cur: dict, upstream: list[str]) -> str:
    """``train-onegen was run with --steps 300; this run asks for 10`` (or what else differs)."""
    if rec is None:
        return f"{st.name} holds the output of a run that did not record its options (an older quickstart)"
    old, new = rec.get("options", {}), cur["options"]
    keys = [k for k in {**old, **new} if old.get(k) != new.get(k)]
    if keys:
        was = ", ".join(_flag(k, old.get(k)) for k in keys)
        now = (str(new.get(keys[0])) if len(keys) == 1 and not isinstance(new.get(keys[0]), bool)
               else ", ".join(_flag(k, new.get(k)) for k in keys))
        return f"{st.name} was run with {was}; this run asks for {now}"
    if upstream or rec.get("inputs") != cur["inputs"]:
        names = upstream or [k for k in cur["inputs"] if rec.get("inputs", {}).get(k) != cur["inputs"][k]]
        return f"{st.name} was run on another {', '.join(names)} (it is produced again by this run)"
    removed = [c for c in rec.get("command", []) if c not in cur["command"]]
    added = [c for c in cur["command"] if c not in rec.get("command", [])]
    return f"{st.name} was run with another command (was: {' '.join(removed) or '-'}; now: {' '.join(added) or '-'})"


def _shown(p: Path) -> str:
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return str(p)


def _plan(stages: list[Stage], rel: _Paths) -> dict[str, str | None]:
    """Per stage: None (reuse or resume) or why it is run again; refuses, before anything is touched,
    when a stage that must be kept (training) would have to be replaced."""
    replaced: list[Path] = []  # outputs this run writes anew: whatever reads them runs again too
    resumed: list[Path] = []  # outputs of interrupted stages, finished now with the same options
    plan, refusals = {}, []
    under = lambda i, outs: any(i == r or r in i.parents for r in outs)  # noqa: E731
    for st in stages:
        rec, cur = _read_record(st), _current(st, rel)
        upstream = [rel(str(i)) for i in st.inputs if under(i, replaced)]
        # an input still being finished is judged when this stage's turn comes (_run_stages)
        pending = {rel(str(i)) for i in st.inputs if under(i, resumed)}
        if rec is not None and pending:
            cur["inputs"].update({k: rec.get("inputs", {}).get(k) for k in pending})
        had_output = st.out.exists() and (st.out.is_file() or any(st.out.iterdir()))
        if _same(rec, cur) and not upstream:
            plan[st.name] = None
            if not (rec.get("finished") and all(p.exists() for p in st.done)):
                resumed.append(st.out)
            continue
        plan[st.name] = _why_changed(st, rec, cur, upstream) if (rec is not None or had_output) else "first run"
        replaced.append(st.out)
        if st.keep and plan[st.name] != "first run":
            refusals.append(f"{plan[st.name]}: use another --out or delete {_shown(st.out)}")
    if refusals:
        raise SystemExit("error: " + "\nerror: ".join(refusals) + "\n(nothing was changed: a trained model is "
                         "never replaced silently)")
    return plan


def run_stages(stages: list[Stage], out: Path) -> None:
    """Run each stage in order, reusing those done before with the same options (see the docstring)."""
    rel = _Paths(out)
    plan = _plan(stages, rel)
    for st in stages:
        rec, cur = _read_record(st), _current(st, rel)  # inputs as they are now, after the stages before
        finished = bool(rec and rec.get("finished")) and all(p.exists() for p in st.done)
        if _same(rec, cur) and finished and plan[st.name] is None:
            print(f"\n==> {st.title}: done before, same options ({_shown(st.out)})", flush=True)
            continue
        why = plan[st.name] if plan[st.name] is not None else None if _same(rec, cur) else _why_changed(st, rec, cur, [])
        if why is not None and why != "first run":
            if st.keep:
                raise SystemExit(f"error: {why}: use another --out or delete {_shown(st.out)}")
            print(f"\n==> {st.name}: {why}: running it again", flush=True)
            if not st.file and st.out.is_dir() and out in st.out.parents:
                shutil.rmtree(st.out)
        st.record.parent.mkdir(parents=True, exist_ok=True)
        st.record.write_text(json.dumps({**cur, "finished": False}, indent=2))
        t0 = time.time()
        run_command(st.cmd, out / "logs" / f"{st.name}.log", st.title)
        # the wall time of the run that finished it (a resumed stage: of its last part)
        st.record.write_text(json.dumps({**cur, "finished": True, "seconds": round(time.time() - t0, 1)}, indent=2))


def stage_seconds(stages: list[Stage]) -> dict[str, float | None]:
    """Each stage's recorded wall time (None: reused from a run that did not record it)."""
    return {st.name: (_read_record(st) or {}).get("seconds") for st in stages}
