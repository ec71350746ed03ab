"""The README's commands exist and parse (the two set-up commands, every CLI it shows answers --help),
and every command of its ```bash blocks works, in order, after the quickstart (slow)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.train_fixtures import ROOT, env, user_env

README = (ROOT / "README.md").read_text()


def test_two_commands_are_there_and_ci_runs_the_test_one():
    block = README.split("## Two commands", 1)[1].split("```", 2)[1]
    cmds = [line.split("#")[0].strip() for line in block.splitlines() if line.startswith("bash ")]
    assert cmds[:2] == ["bash scripts/quickstart.sh", "bash scripts/test.sh"], cmds
    assert "scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
    for c in cmds[:2]:
        assert (ROOT / c.split()[1]).is_file()


def test_every_python_entry_point_in_the_readme_answers_help():
    modules = sorted(set(re.findall(r"python -m (data_prep|evaluation|onegen\.quickstart)\b", README)))
    scripts = sorted(set(re.findall(r"python (pipeline/train\.py|bench/\w+\.py)", README)))
    assert "data_prep" in modules and "evaluation" in modules and "pipeline/train.py" in scripts
    for target in [["-m", m] for m in modules] + [[s] for s in scripts]:
        p = subprocess.run([sys.executable, *target, "--help"], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, (target, p.stderr[-2000:])
        # argparse's own help of that program (not some other output that happens to be long)
        assert p.stdout.startswith("usage: ") and "-h, --help" in p.stdout, (target, p.stdout[:500])


def test_every_recipe_and_file_the_readme_names_exists():
    for path in set(re.findall(r"\b((?:configs|ds_configs|docs|slurm|bench|scripts)/[\w.\-]+\.(?:yaml|json|md|sh|py))\b", README)):
        if "*" not in path:
            assert (ROOT / path).exists(), path


# ---- every command of the README's ```bash blocks, in order, after the quickstart ----------------

# What is not run, and why. Every rule must match at least one README line (a stale rule fails).
# (`mlflow ui`, a server that runs until stopped, is named in the prose only, not in a block.)
SKIP = [
    (re.compile(r"^bash scripts/quickstart\.sh"), "the quickstart: the test ran it first (--preset tiny --small)"),
    (re.compile(r"^bash scripts/test\.sh"), "the whole test suite, which this test is part of"),
    (re.compile(r"^bash scripts/benchmark\.sh( --config configs/benchmark/(toy|gpu)\.yaml.*)?$"),
     "the real-benchmark run (81 min), its GPU variant, and its toy size (tests/test_benchmark.py runs that)"),
    (re.compile(r"^deepspeed --num_gpus"), "a launcher for GPUs"),
    (re.compile(r"^sbatch "), "a launcher for a SLURM cluster"),
    (re.compile(r"^python bench/efficiency\.py"), "a bench sweep of minutes (tests/test_efficiency_bench.py runs --quick)"),
    (re.compile(r"--from-hub"), "downloads from the Hugging Face hub"),
    (re.compile(r"--input (hotpot_train_v1\.1\.json|dev\.json|kore50\.benchmark\.jsonl|train\.jsonl) "),
     "reads a benchmark file the user downloads (not shipped)"),
]
# The checkout's folders the commands name by relative path (configs/..., pipeline/train.py, ...).
LINKED = ("configs", "ds_configs", "pipeline", "bench", "slurm", "scripts")


def readme_commands() -> list[tuple[str, str | None]]:
    """(command, why it is skipped or None) for every line of every ```bash block, in order."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        for line in block.splitlines():
            cmd = re.sub(r"\s+#.*$", "", line).strip()
            if cmd and not cmd.startswith("#"):
                out.append((cmd, next((why for rx, why in SKIP if rx.search(cmd)), None)))
    return out


def test_readme_commands_are_parsed_and_every_skip_rule_is_used():
    cmds = readme_commands()
    run = [c for c, why in cmds if why is None]
    assert any(c.startswith("python -m data_prep world") for c in run)
    assert any(c.startswith("python pipeline/train.py --config configs/tiny-cpu.yaml") for c in run)
    assert sum(c.startswith(("python -m evaluation", "for m in")) for c in run) >= 4
    for rx, why in SKIP:
        assert any(rx.search(c) for c, _ in cmds), f"skip rule {rx.pattern!r} ({why}) matches no README command"


@pytest.mark.slow
def test_every_readme_command_works_in_order_after_the_quickstart(quickstart_small, tmp_path):
    """After the quickstart (reduced; the session's shared run, copied to `runs/quickstart`), each command of
    the README from a directory laid out like the checkout (its folders linked), so that `runs/...` lands in
    tmp. Run without scripts/env.sh: the entry points set the offline environment themselves."""
    work = tmp_path / "checkout"
    work.mkdir()
    for d in LINKED:
        (work / d).symlink_to(ROOT / d)
    e = user_env()
    e["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{e.get('PATH', '')}"  # python, torchrun of this venv
    e["PYTHONPATH"] = str(ROOT)
    shutil.copytree(quickstart_small[0], work / "runs" / "quickstart", symlinks=True)
    ran, skipped = [], []
    for cmd, why in readme_commands():
        if why is not None:
            skipped.append(f"{cmd[:60]}: {why}")
            continue
        p = subprocess.run(["bash", "-c", cmd], cwd=work, env=e, capture_output=True, text=True, timeout=1800)
        assert p.returncode == 0, f"README command failed ({p.returncode}): {cmd}\n{p.stdout[-3000:]}\n{p.stderr[-4000:]}"
        ran.append(cmd)
    print("ran:\n  " + "\n  ".join(ran) + "\nskipped:\n  " + "\n  ".join(skipped))
    assert (work / "runs" / "tiny-cpu" / "model" / "manifest.json").is_file()
    assert (work / "runs" / "comparison.png").is_file() and (work / "runs" / "eval" / "no-retrieval" / "metrics.json").is_file()
