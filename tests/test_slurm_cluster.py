"""slurm/*.sh on a real SLURM: a one-node cluster (munged + slurmctld + slurmd) started by this test on
this machine, real jobs (slow; CI runs it).

Set-up: Debian's slurmctld/slurmd/slurm-client/munge (apt-get install when missing), a slurm.conf for
``localhost`` with this machine's CPUs (select/cons_tres, proctrack/linuxproc, task/none: no cgroups),
state and spool under a temporary directory, ports picked free, its own munge key and socket; the
daemons run in the foreground as children of this test and are stopped (with any job process that
carries this cluster's SLURM_CONF) at teardown. ``cred_expire=10`` shortens SLURM's fixed delay
before a requeued job may start again (default 120 s).

  1. ``slurm/launch.sh prep``: a 3-task job array + afterok finishing job gives the manifest
     fingerprint of one ``python -m data_prep prepare`` (tasks racing to create the BPE tokenizer).
  2. ``sbatch slurm/train.sh`` (tiny model, 2 gloo ranks) to completion: checkpoint + export; then
     ``sbatch slurm/eval.sh`` on the exported model, logging into the training run's MLflow store.
  3. the same run, sent USR1 as SLURM does before a time limit: it checkpoints, requeues itself,
     resumes and ends at max_steps with the loss of the uninterrupted run.
Needs root (daemons, apt); skips with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import ROOT
from train_fixtures import TINY_MODEL, env as train_env, make_world

pytestmark = pytest.mark.slow

PACKAGES = {"slurmctld": "slurmctld", "slurmd": "slurmd", "sbatch": "slurm-client", "munged": "munge"}
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED", "SPECIAL_EXIT"}
TRAIN_STEPS = 24
TRAIN_ARGS = ["configs/tiny-cpu.yaml", "data.eval=[]", *TINY_MODEL, f"optim.max_steps={TRAIN_STEPS}",
              "optim.warmup_steps=2", "optim.micro_batch_size=4", "checkpoint_every=100"]


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")


def _ensure_slurm() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: installs Debian's slurm packages and starts munged/slurmctld/slurmd")
    missing = sorted({pkg for exe, pkg in PACKAGES.items() if _which(exe) is None})
    if not missing:
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    p = subprocess.run(f"apt-get update -qq && apt-get install -y -qq {' '.join(missing)}", shell=True, env=env,
                       capture_output=True, text=True, timeout=900)
    still = sorted({pkg for exe, pkg in PACKAGES.items() if _which(exe) is None})
    if p.returncode != 0 or still:
        pytest.skip(f"could not install {' '.join(still or missing)} (apt-get exit {p.returncode}): {p.stderr[-500:]}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(self, base: Path):
        self.base = base
        self.conf = base / "slurm.conf"
        self.procs: list[subprocess.Popen] = []
        self.logs: dict[str, Path] = {}

    # -- commands ---------------------------------------------------------------------------------

    def env(self, **extra: str) -> dict:
        e = train_env()
        e = {k: v for k, v in e.items() if not k.startswith(("SLURM_", "SBATCH_"))}
        venv = Path(sys.prefix)
        e.update(SLURM_CONF=str(self.conf), ONEGEN_ROOT=str(ROOT), PYTHON=sys.executable,
                 ONEGEN_VENV=str(venv) if (venv / "bin" / "activate").is_file() else "none",
                 PATH=f"{Path(sys.executable).parent}{os.pathsep}{e.get('PATH', '')}")
        e.update(extra)
        return e

    def run(self, *cmd: str, cwd: Path | None = None, check: bool = True, **extra: str) -> str:
        p = subprocess.run(list(cmd), env=self.env(**extra), cwd=cwd or self.base, capture_output=True, text=True,
                           timeout=120)
        if check and p.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}\n{self.daemon_logs()}")
        return p.stdout

    def jobs(self, job: str) -> list[dict]:
        """``scontrol show job`` (one dict per array task); no accounting daemon here, so no sacct."""
        out = self.run("scontrol", "show", "job", "-o", job)
        return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.splitlines() if line.strip()]

    def wait(self, job: str, log: Path | None = None, timeout: float = 900) -> list[dict]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.jobs(job)
            if info and all(j["JobState"] in TERMINAL for j in info):
                return info
            time.sleep(2)
        self.run("scancel", job, check=False)
        raise AssertionError(f"job {job} did not end within {timeout} s: {self.jobs(job)}\n{_tail(log)}")

    def daemon_logs(self) -> str:
        return "\n".join(f"--- {name}\n{_tail(p, 3000)}" for name, p in self.logs.items())

    # -- life cycle -------------------------------------------------------------------------------

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = self.base / "log" / f"{name}.out"
        self.logs[name] = log
        with open(log, "wb") as f:
            self.procs.append(subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=self.env(),
                                               cwd=self.base, start_new_session=True))

    def start(self) -> None:
        b = self.base
        for d in ("state", "spool", "log", "munge", "key"):
            (b / d).mkdir()
        b.chmod(0o755)
        (b / "munge").chmod(0o755)
        (b / "key").chmod(0o700)
        key = b / "key" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        sock = b / "munge" / "munge.socket"
        self._spawn("munged", [_which("munged"), "--foreground", "--force", f"--key-file={key}", f"--socket={sock}",
                               f"--pid-file={b / 'munge' / 'munged.pid'}", f"--seed-file={b / 'munge' / 'seed'}"])
        _until(lambda: sock.exists(), 20, lambda: f"munged did not start\n{self.daemon_logs()}")
        cpus = os.cpu_count() or 1
        self.conf.write_text(f"""\
ClusterName=onegentest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={sock},cred_expire=10
SlurmUser=root
SlurmdUser=root
StateSaveLocation={b / 'state'}
SlurmdSpoolDir={b / 'spool'}
SlurmctldPidFile={b / 'slurmctld.pid'}
SlurmdPidFile={b / 'slurmd.pid'}
SlurmctldLogFile={b / 'log' / 'slurmctld.log'}
SlurmdLogFile={b / 'log' / 'slurmd.log'}
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
JobRequeue=1
MinJobAge=3600
KillWait=30
SlurmdTimeout=120
InactiveLimit=0
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
""")
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-c"])
        self._spawn("slurmd", [_which("slurmd"), "-D", "-N", "localhost"])

        def idle() -> bool:
            for p in self.procs:
                if p.poll() is not None:
                    raise AssertionError(f"a SLURM daemon exited ({p.args[0]}: {p.returncode})\n{self.daemon_logs()}")
            out = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env(), capture_output=True, text=True)
            return out.stdout.strip() == "idle"

        _until(idle, 90, lambda: f"the node never became idle\n{self.daemon_logs()}")

    def stop(self) -> list[str]:
        """Cancel every job, stop the daemons we started, then kill whatever still carries our SLURM_CONF."""
        try:
            ids = subprocess.run(["squeue", "-h", "-o", "%i"], env=self.env(), capture_output=True, text=True,
                                 timeout=30).stdout.split()
            if ids:
                subprocess.run(["scancel", *ids], env=self.env(), capture_output=True, timeout=30)
                _until(lambda: not subprocess.run(["squeue", "-h"], env=self.env(), capture_output=True, text=True,
                                                   timeout=30).stdout.strip(), 60, lambda: "jobs still queued")
        except Exception:
            pass  # the daemons may be the thing that failed; the sweep below still cleans up
        for p in reversed(self.procs):  # slurmd, slurmctld, munged
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(10)
        leftovers = self._ours()
        for pid, _ in leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return [f"{pid} {cmd}" for pid, cmd in leftovers]

    def _ours(self) -> list[tuple[int, str]]:
        """Processes started for this cluster: slurmstepd and job processes inherit its SLURM_CONF."""
        marker = f"SLURM_CONF={self.conf}".encode()
        found = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) == os.getpid():
                continue
            try:
                if marker in (d / "environ").read_bytes().split(b"\0"):
                    found.append((int(d.name), (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")))
            except OSError:
                continue
        return found


def _until(cond, timeout: float, msg) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.5)
    raise AssertionError(msg())


def _tail(path: Path | None, n: int = 6000) -> str:
    if path is None or not path.exists():
        return f"({path}: no file)"
    text = path.read_text(errors="replace")
    # tqdm redraws with \r: keep the last state of each line
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text[-n:].splitlines())


@pytest.fixture(scope="module")
def cluster():
    _ensure_slurm()
    base = Path(tempfile.mkdtemp(prefix="onegen-slurm-", dir="/tmp"))  # short: unix socket paths
    c = Cluster(base)
    t0 = time.time()
    try:
        c.start()
        print(f"\n[cluster] up in {time.time() - t0:.1f} s ({base})")
        yield c
    finally:
        left = c.stop()
        shutil.rmtree(base, ignore_errors=True)
        assert not left, f"processes of the test cluster were still running (killed): {left}"


@pytest.fixture(scope="module")
def shared() -> dict:
    """What one test leaves for a later one (the uninterrupted run's final loss)."""
    return {}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("slurm-world") / "world", questions=60)


def _sbatch(cluster: Cluster, work: Path, *args: str, **env: str) -> str:
    (work / "logs").mkdir(exist_ok=True)  # SLURM does not create the --output directory
    return cluster.run("sbatch", "--parsable", *args, cwd=work, **env).strip().split(";")[0]


def _metrics_steps(out: Path) -> list[int]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [int(r["step"]) for r in rows if "loss" in r]


def _submit_train(cluster: Cluster, world: Path, work: Path, *overrides: str) -> tuple[Path, str, Path]:
    """slurm/train.sh on CPU nodes (2 gloo ranks where 2 CPUs allow) on the world's RAG training set, into
    ``work``/run: that output dir, the job id and the job's log."""
    out = work / "run"
    job = _sbatch(cluster, work, "--gpus-per-node=0", f"--cpus-per-task={min(2, os.cpu_count() or 1)}",
                  str(ROOT / "slurm" / "train.sh"), *TRAIN_ARGS, *overrides, f"data.train=[{world / 'rag_train'}]",
                  f"output_dir={out}")
    return out, job, work / "logs" / f"onegen-train-{job}.out"


def _until_training(out: Path, log: Path) -> None:
    """Wait until the job's trainer has logged two steps."""
    _until(lambda: (out / "metrics.jsonl").exists() and len(_metrics_steps(out)) >= 2, 600,
           lambda: f"training never started\n{_tail(log)}")


def test_prep_job_array_matches_single_machine(cluster, tmp_path):
    from data_prep.__main__ import main
    from data_prep.synthetic import WorldConfig, generate_world

    raw = tmp_path / "raw"
    generate_world(WorldConfig(n_train_questions=200, n_dev_questions=5, n_train_el=5, n_dev_el=5), raw, progress=False)
    args = ["--kind", "2wiki", "--input", str(raw / "train.json"), "--tokenizer", "bpe:400", "shard_size=25",
            "doc_shard_size=300", "tagging.max_length=256", "tagging.max_doc_length=96"]
    assert main(["prepare", *args, "--out", str(tmp_path / "single")]) == 0
    single = json.loads((tmp_path / "single" / "manifest.json").read_text())
    assert len(single["shards"]["queries"]) == 8

    t0 = time.time()
    out = cluster.run("bash", str(ROOT / "slurm" / "launch.sh"), "prep", "--cpus-per-task=1", "--",
                      *args, "--out", str(tmp_path / "array"), cwd=tmp_path, PREP_TASKS="3")
    array_job, finish_job = out.split()
    finish_log = tmp_path / "logs" / f"onegen-prep-finish-{finish_job}.out"
    fin = cluster.wait(finish_job, finish_log, timeout=600)
    tasks = cluster.jobs(array_job)
    logs = "\n".join(_tail(p) for p in sorted((tmp_path / "logs").glob("*.out")))
    assert [t["JobState"] for t in tasks] == ["COMPLETED"] * 3, logs
    assert fin[0]["JobState"] == "COMPLETED", logs
    print(f"[cluster] prep array (3 tasks) + finish: {time.time() - t0:.1f} s")
    for i in range(3):
        assert f"task {i}/3: wrote" in _tail(tmp_path / "logs" / f"onegen-prep-{array_job}_{i}.out"), logs
    array = json.loads((tmp_path / "array" / "manifest.json").read_text())
    assert array["fingerprint"] == single["fingerprint"], logs
    assert array["counts"] == single["counts"]


def test_train_to_completion_then_eval(cluster, world, shared, tmp_path):
    t0 = time.time()
    out, job, log = _submit_train(cluster, world, tmp_path)
    info = cluster.wait(job, log)[0]
    text = _tail(log, 20000)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text
    print(f"[cluster] train job ({TRAIN_STEPS} steps): {time.time() - t0:.1f} s")
    assert "--nnodes 1 --node_rank 0 --nproc_per_node 2" in text or (os.cpu_count() or 1) < 2, text
    assert f"[train] done: step {TRAIN_STEPS}" in text, text
    assert (out / "checkpoints" / f"step-{TRAIN_STEPS:06d}" / "COMPLETE").is_file()
    assert (out / "model" / "config.json").is_file() and list((out / "model").glob("*.safetensors"))
    assert _metrics_steps(out)[-1] == TRAIN_STEPS
    summary = json.loads((out / "summary.json").read_text())
    shared["uninterrupted_loss"] = summary["final"]["loss"]  # compared by the preemption test

    # Evaluate the exported checkpoint: index + onegen run, logged into the training run's MLflow store.
    t0 = time.time()
    results = tmp_path / "eval"
    job = _sbatch(cluster, tmp_path, "--gpus-per-node=0", "--cpus-per-task=1", str(ROOT / "slurm" / "eval.sh"),
                  str(out / "model"), str(world / "rag_dev"), "--max-examples", "3", "--max-new-tokens", "16",
                  EVAL_OUT=str(results), INDEX_DIR=str(tmp_path / "index"))
    log = tmp_path / "logs" / f"onegen-eval-{job}.out"
    info = cluster.wait(job, log, timeout=600)[0]
    text = _tail(log, 20000)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text
    print(f"[cluster] eval job: {time.time() - t0:.1f} s")
    assert (results / "metrics.json").is_file() and (tmp_path / "index").is_dir(), text
    with sqlite3.connect(out / "mlflow.db") as db:  # the default store of the training run (sqlite under OUTPUT)
        n = db.execute("select count(*) from tags where key = 'onegen.stage' and value = 'eval'").fetchone()[0]
    assert n == 1, text


def test_preempted_run_requeues_and_resumes(cluster, world, shared, tmp_path):
    t0 = time.time()
    out, job, log = _submit_train(cluster, world, tmp_path)
    # Once training is under way, do what --signal=B:USR1@120 does before a time limit.
    _until_training(out, log)
    cluster.run("scancel", "--signal=USR1", "--batch", job)
    info = cluster.wait(job, log)[0]
    text = _tail(log, 60000)
    print(f"[cluster] preempted + requeued train job: {time.time() - t0:.1f} s")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text
    assert info["Restarts"] == "1", text
    m = re.search(r"\[train\] signal 10: checkpoint (step-\d+) written", text)
    assert m, text
    assert "requeuing job" in text and f"resuming from {m.group(1)}" in text, text
    assert f"[train] done: step {TRAIN_STEPS}" in text, text
    stopped_at = int(m.group(1).split("-")[1])
    assert 0 < stopped_at < TRAIN_STEPS
    assert (out / "checkpoints" / m.group(1) / "COMPLETE").is_file()
    steps = _metrics_steps(out)
    assert steps[-1] == TRAIN_STEPS and sorted(set(steps)) == list(range(1, TRAIN_STEPS + 1)), steps
    if "uninterrupted_loss" in shared:  # the same data position, RNG and optimizer state: the same final loss
        final = json.loads((out / "summary.json").read_text())["final"]
        assert final["loss"] == pytest.approx(shared["uninterrupted_loss"], abs=1e-3)


def test_scancel_leaves_a_complete_checkpoint(cluster, world, tmp_path):
    """`scancel`: TERM to every process; the trainer checkpoints within KillWait; no requeue."""
    from pipeline.checkpoint import MARKER, latest_complete

    t0 = time.time()
    out, job, log = _submit_train(cluster, world, tmp_path, "optim.max_steps=1000")
    _until_training(out, log)
    cluster.run("scancel", job)
    info = cluster.wait(job, log, timeout=300)[0]
    time.sleep(2)  # the log of the last processes
    text = _tail(log, 60000)
    print(f"[cluster] cancelled train job: {time.time() - t0:.1f} s")
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", text
    assert "requeuing" not in text, text
    last = latest_complete(out / "checkpoints")
    assert last is not None, f"no complete checkpoint after scancel\n{text}"
    assert json.loads((last / MARKER).read_text())["step"] >= 2
    assert f"[train] signal 15: checkpoint {last.name} written" in text, text
