"""The SLURM scripts, rendered without SLURM (fast): fake ``srun``/``scontrol``/``sbatch`` on PATH, a fake
allocation in the environment, and ``ONEGEN_DRY_RUN=1`` so each node prints its torchrun command
instead of starting it. Plus the data_prep job-array split (``--only-shards``/``--finish-only``) in
process: it must give the single-machine manifest fingerprint.

The real thing (slurmctld + slurmd on this machine, real jobs) is tests/test_slurm_cluster.py.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
import subprocess
from pathlib import Path

from conftest import ROOT

FAKE_SCONTROL = r'''#!/usr/bin/env bash
# scontrol show hostnames "node[01-04],login" -> one host per line (what SLURM's hostlist expansion does)
[ "$1 $2" = "show hostnames" ] || { echo "fake scontrol: unsupported: $*" >&2; exit 1; }
exec python3 - "$3" <<'PY'
import re, sys
out = []
for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?", sys.argv[1]):
    m = re.match(r"(.*)\[(.*)\]$", part)
    if not m:
        out.append(part)
        continue
    prefix, ranges = m.groups()
    for r in ranges.split(","):
        a, _, b = r.partition("-")
        for i in range(int(a), int(b or a) + 1):
            out.append(f"{prefix}{i:0{len(a)}d}")
print("\n".join(out))
PY
'''

# One task per node, run one after the other, each with the per-node variables SLURM would set.
FAKE_SRUN = r'''#!/usr/bin/env bash
opts=()
while [ $# -gt 0 ] && [ "${1#-}" != "$1" ]; do opts+=("$1"); shift; done
echo "${opts[*]}" >> "$FAKE_LOG"
for ((i = 0; i < SLURM_NNODES; i++)); do
  SLURM_NODEID=$i SLURM_PROCID=$i SLURM_LOCALID=0 "$@" || exit $?
done
'''

FAKE_SBATCH = r'''#!/usr/bin/env bash
n=$(( $(wc -l < "$FAKE_LOG" 2>/dev/null || echo 0) + 100 ))
printf '%s\n' "$*" >> "$FAKE_LOG"
echo "$n;cluster"
'''


def _bin(tmp: Path) -> Path:
    d = tmp / "bin"
    d.mkdir(exist_ok=True)
    for name, text in (("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN), ("sbatch", FAKE_SBATCH)):
        p = d / name
        p.write_text(text)
        p.chmod(p.stat().st_mode | stat.S_IEXEC)
    return d


def _env(tmp: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SBATCH_", "NCCL_", "TORCH_NCCL_", "MLFLOW_", "ONEGEN_"))
           and k not in ("MASTER_ADDR", "MASTER_PORT", "GPUS_PER_NODE", "CPU_PROCS_PER_NODE", "OMP_NUM_THREADS",
                         "PYTHON", "VIRTUAL_ENV")}
    env.update(PATH=f"{_bin(tmp)}{os.pathsep}{env.get('PATH', '')}", FAKE_LOG=str(tmp / "fake.log"),
               SLURM_SUBMIT_DIR=str(ROOT), ONEGEN_VENV="none", PYTHON="python3", ONEGEN_DRY_RUN="1")
    env.update(extra)
    return env


def _run(script: str, args: list[str], env: dict, cwd: Path) -> str:
    p = subprocess.run(["bash", str(ROOT / "slurm" / script), *args], env=env, cwd=cwd, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, f"{script} failed ({p.returncode})\n--- stdout\n{p.stdout}\n--- stderr\n{p.stderr}"
    return p.stdout


def _node_lines(out: str) -> list[tuple[dict, list[str]]]:
    """Each node's printed environment and torchrun argv."""
    nodes = []
    for line in out.splitlines():
        m = re.match(r"\[node (\d+)/(\d+) \S+\] env: (.*); cmd: (.*)$", line)
        if m:
            env = dict(kv.split("=", 1) for kv in m.group(3).split())
            nodes.append((env, shlex.split(m.group(4))))
    return nodes


def _opt(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_multinode_launch_4x8(tmp_path):
    """4 nodes x 8 GPUs: distinct node ranks, one rendezvous, recipe and overrides passed through."""
    env = _env(tmp_path, SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu[01-04]", SLURM_NNODES="4",
               SLURM_NODEID="0",  # the batch step's own value: must not leak into the nodes' commands
               SLURM_GPUS_ON_NODE="8", SLURM_CPUS_ON_NODE="96", SLURM_JOB_NAME="onegen-train",
               MLFLOW_TRACKING_URI="http://mlflow-host:5000")
    out = _run("train.sh", ["configs/tiny-cpu.yaml", "optim.max_steps=10", "run_name=with space"], env, tmp_path)
    nodes = _node_lines(out)
    assert len(nodes) == 4, out
    ranks = sorted(int(_opt(argv, "--node_rank")) for _, argv in nodes)
    assert ranks == [0, 1, 2, 3], out
    for node_env, argv in nodes:
        assert argv[:3] == ["python3", "-m", "torch.distributed.run"], argv
        assert _opt(argv, "--nnodes") == "4"
        assert _opt(argv, "--nproc_per_node") == "8"
        assert _opt(argv, "--master_addr") == "gpu01"
        assert _opt(argv, "--master_port") == str(20000 + 4242 % 20000)
        script = argv.index("pipeline/train.py")
        assert argv[script + 1:] == ["--config", "configs/tiny-cpu.yaml", "mlflow_tracking_uri=http://mlflow-host:5000",
                                     "optim.max_steps=10", "run_name=with space"]
        assert node_env["NCCL_DEBUG"] == "WARN"
        assert node_env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
        assert node_env["OMP_NUM_THREADS"] == "12"  # 96 CPUs / 8 ranks
    srun_opts = (tmp_path / "fake.log").read_text()
    assert "--ntasks-per-node=1" in srun_opts and "--nodes=4" in srun_opts, srun_opts


def test_cpu_launch_and_explicit_overrides(tmp_path):
    """No GPUs: gloo ranks per node = CPU_PROCS_PER_NODE (default min(2, CPUs)); an explicit URI override wins."""
    env = _env(tmp_path, SLURM_JOB_ID="7", SLURM_JOB_NODELIST="cpu-a,cpu-b", SLURM_NNODES="2", SLURM_NODEID="0",
               SLURM_CPUS_ON_NODE="8", SLURM_GPUS_PER_NODE="0", MLFLOW_TRACKING_URI="http://ignored:5000")
    out = _run("train.sh", ["--config", "configs/tiny-cpu.yaml", "mlflow_tracking_uri=sqlite:///x.db"], env, tmp_path)
    nodes = _node_lines(out)
    assert sorted(int(_opt(a, "--node_rank")) for _, a in nodes) == [0, 1]
    for node_env, argv in nodes:
        assert _opt(argv, "--nproc_per_node") == "2" and _opt(argv, "--master_addr") == "cpu-a"
        assert node_env["OMP_NUM_THREADS"] == "4" and "NCCL_DEBUG" not in node_env
        assert argv[argv.index("pipeline/train.py") + 1:] == ["--config", "configs/tiny-cpu.yaml", "mlflow_tracking_uri=sqlite:///x.db"]
    env["CPU_PROCS_PER_NODE"] = "4"
    assert all(_opt(a, "--nproc_per_node") == "4" for _, a in _node_lines(_run("train.sh", ["configs/tiny-cpu.yaml"], env, tmp_path)))


def _sbatch_header(script: str) -> list[str]:
    """#SBATCH lines; sbatch stops reading them at the first command, so they must all come before it."""
    lines = (ROOT / "slurm" / script).read_text().splitlines()
    first_cmd = next(i for i, l in enumerate(lines) if l.strip() and not l.startswith("#"))
    assert not any(l.startswith("#SBATCH") for l in lines[first_cmd:]), f"{script}: #SBATCH after the first command"
    return [l.split(None, 1)[1] for l in lines[:first_cmd] if l.startswith("#SBATCH")]


def test_sbatch_headers():
    train = _sbatch_header("train.sh")
    for want in ("--ntasks-per-node=1", "--requeue", "--open-mode=append", "--output=logs/%x-%j.out"):
        assert want in train, train
    assert any(re.fullmatch(r"--signal=B:USR1@\d+", h) for h in train), train
    assert any(h.startswith("--nodes=") for h in train) and any(h.startswith("--gpus-per-node=") for h in train)
    prep = _sbatch_header("prep.sh")
    assert "--output=logs/%x-%A_%a.out" in prep and not any(h.startswith("--array") for h in prep)
    assert "--output=logs/%x-%j.out" in _sbatch_header("eval.sh")


def test_train_requests_cpus_and_the_step_uses_them(tmp_path):
    """#SBATCH --cpus-per-task: 8 ranks must not share the one CPU some clusters give a task by default.
    The srun step asks for the job's --cpus-per-task (the srun of SLURM 22.05-23.02 does not inherit it) and the
    ranks split that count, not the node's (an --exclusive job sees every CPU of the node)."""
    header = _sbatch_header("train.sh")
    gpus = int(next(h for h in header if h.startswith("--gpus-per-node=")).split("=")[1])
    cpus = [int(h.split("=")[1]) for h in header if h.startswith("--cpus-per-task=")]
    assert len(cpus) == 1 and cpus[0] >= 4 * gpus, header  # at least 4 CPUs per GPU rank
    env = _env(tmp_path, SLURM_JOB_ID="5", SLURM_JOB_NODELIST="gpu[01-02]", SLURM_NNODES="2", SLURM_NODEID="0",
               SLURM_GPUS_ON_NODE=str(gpus), SLURM_CPUS_PER_TASK=str(cpus[0]), SLURM_CPUS_ON_NODE="224")
    nodes = _node_lines(_run("train.sh", ["configs/tiny-cpu.yaml"], env, tmp_path))
    assert len(nodes) == 2
    for node_env, argv in nodes:
        assert _opt(argv, "--nproc_per_node") == str(gpus)
        assert node_env["OMP_NUM_THREADS"] == str(cpus[0] // gpus), node_env
    srun_opts = (tmp_path / "fake.log").read_text().split()
    assert f"--cpus-per-task={cpus[0]}" in srun_opts, srun_opts
    # sbatch --cpus-per-task=16 (a smaller node): the step and the ranks follow it.
    (tmp_path / "fake.log").unlink()
    env["SLURM_CPUS_PER_TASK"] = "16"
    nodes = _node_lines(_run("train.sh", ["configs/tiny-cpu.yaml"], env, tmp_path))
    assert {n["OMP_NUM_THREADS"] for n, _ in nodes} == {str(16 // gpus)}
    assert "--cpus-per-task=16" in (tmp_path / "fake.log").read_text().split()
    # launch.sh: CPUS_PER_TASK becomes the sbatch flag (it overrides the script's #SBATCH line).
    launch_env = dict(_env(tmp_path, CPUS_PER_TASK="32"))
    launch_env.pop("ONEGEN_DRY_RUN")
    p = subprocess.run(["bash", str(ROOT / "slurm" / "launch.sh"), "train", "configs/x.yaml"], env=launch_env,
                       cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "--cpus-per-task=32" in (tmp_path / "fake.log").read_text().splitlines()[-1].split()


def test_prep_array_and_finish_commands(tmp_path):
    env = _env(tmp_path, SLURM_JOB_ID="9", SLURM_ARRAY_TASK_ID="6", SLURM_ARRAY_TASK_MIN="4", SLURM_ARRAY_TASK_COUNT="3",
               SLURM_CPUS_PER_TASK="4")
    args = ["--kind", "hotpotqa", "--input", "in.json", "--out", "runs/p"]
    line = _run("prep.sh", args, env, tmp_path).splitlines()[-1]
    argv = shlex.split(line.split("] ", 1)[1])
    assert argv[1:] == ["-m", "data_prep", "prepare", "--num-proc", "4", "--only-shards", "2/3", *args], argv
    env = _env(tmp_path, SLURM_JOB_ID="10", ONEGEN_PREP_STEP="finish")
    argv = shlex.split(_run("prep.sh", args, env, tmp_path).splitlines()[-1].split("] ", 1)[1])
    assert "--finish-only" in argv and "--only-shards" not in argv


def test_eval_commands(tmp_path):
    env = _env(tmp_path, SLURM_JOB_ID="11")
    out = _run("eval.sh", ["runs/x/model", "runs/world/rag_dev", "--max-examples", "5"], env, tmp_path)
    index = shlex.split(re.search(r"index: (.*)", out).group(1))
    run = shlex.split(re.search(r"eval: (.*)", out).group(1))
    assert index[1:5] == ["-m", "evaluation", "index", "--model"] and _opt(index, "--out") == "runs/index/x-rag_dev"
    assert _opt(run, "--method") == "onegen" and _opt(run, "--index") == "runs/index/x-rag_dev"
    assert _opt(run, "--tracking-uri") == "train" and run[-2:] == ["--max-examples", "5"]
    env["MLFLOW_TRACKING_URI"] = "http://mlflow-host:5000"
    out = _run("eval.sh", ["runs/x/model", "runs/world/rag_dev", "--method", "pipeline-bm25"], env, tmp_path)
    assert "index: " not in out  # a separate retriever: no checkpoint index
    run = shlex.split(re.search(r"eval: (.*)", out).group(1))
    assert _opt(run, "--tracking-uri") == "http://mlflow-host:5000" and "--index" not in run
    # a shard of a sharded run (a job-array task) uses the index built before it, and builds none
    for flags in (["--shard", "array"], ["--merge=4"]):
        out = _run("eval.sh", ["runs/x/model", "runs/world/rag_dev", *flags], env, tmp_path)
        run = shlex.split(re.search(r"eval: (.*)", out).group(1))
        assert "index: " not in out and _opt(run, "--index") == "runs/index/x-rag_dev" and run[-len(flags):] == flags


def test_launch_helper_submits(tmp_path):
    """launch.sh: NODES/GPUS_PER_NODE become sbatch flags; prep = array + afterok finishing job; logs/ made."""
    env = _env(tmp_path, NODES="4", GPUS_PER_NODE="8")
    env.pop("ONEGEN_DRY_RUN")
    launch = str(ROOT / "slurm" / "launch.sh")
    p = subprocess.run(["bash", launch, "train", "--time=1:00:00", "configs/x.yaml", "a=1"], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["100"] and (tmp_path / "logs").is_dir()
    p = subprocess.run(["bash", launch, "prep", "--", "--kind", "2wiki", "--out", "runs/p"], env=dict(env, PREP_TASKS="3"),
                       cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["101", "102"]
    calls = (tmp_path / "fake.log").read_text().splitlines()
    train = calls[0].split()
    assert {"--parsable", "--nodes=4", "--gpus-per-node=8", "--time=1:00:00"} <= set(train)
    assert train[-3].endswith("slurm/train.sh") and train[-2:] == ["configs/x.yaml", "a=1"]
    assert calls[1].startswith("--parsable --array=0-2 ") and calls[1].endswith("slurm/prep.sh --kind 2wiki --out runs/p")
    assert "--dependency=afterok:101 " in calls[2] and "ONEGEN_PREP_STEP=finish" in calls[2]


# ---- the data_prep side of the job array --------------------------------------------------------

def test_prep_slices_then_finish_match_single_machine(tmp_path):
    """Tasks 2, 0, 1 of 3 (any order), then --finish-only: the manifest of one uninterrupted prepare."""
    from data_prep.__main__ import main
    from data_prep.synthetic import WorldConfig, generate_world

    raw = tmp_path / "raw"
    generate_world(WorldConfig(n_train_questions=120, n_dev_questions=5, n_train_el=5, n_dev_el=5), raw, progress=False)
    base = ["prepare", "--kind", "2wiki", "--input", str(raw / "train.json"), "--tokenizer", "bpe:300",
            "shard_size=25", "doc_shard_size=300", "tagging.max_length=256", "tagging.max_doc_length=96"]
    assert main([*base, "--out", str(tmp_path / "single")]) == 0
    arr = tmp_path / "array"
    assert main([*base, "--out", str(arr), "--only-shards", "2/3"]) == 0
    assert not (arr / "manifest.json").exists()
    assert main([*base, "--out", str(arr), "--finish-only"]) == 2  # shards of tasks 0 and 1 are missing
    assert not (arr / "manifest.json").exists()
    for task in ("0/3", "1/3"):
        assert main([*base, "--out", str(arr), "--only-shards", task]) == 0
    assert main([*base, "--out", str(arr), "--finish-only"]) == 0
    single = json.loads((tmp_path / "single" / "manifest.json").read_text())
    array = json.loads((arr / "manifest.json").read_text())
    assert len(single["shards"]["queries"]) == 5
    assert array["fingerprint"] == single["fingerprint"]
    assert {k for k in single if single[k] != array[k]} <= {"config", "created", "created_at", "elapsed_s"}
    assert (arr / "quarantine.jsonl").read_bytes() == (tmp_path / "single" / "quarantine.jsonl").read_bytes()
    assert not list(arr.glob(".*")), "helper files left in the prepared directory"


def test_only_shards_rejects_bad_spec(capsys):
    from data_prep.__main__ import main

    assert main(["prepare", "--kind", "2wiki", "--input", "x.json", "--out", "/nonexistent/x", "--only-shards", "3/3"]) == 2
    assert "0 <= I < N" in capsys.readouterr().err
