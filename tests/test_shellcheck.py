"""Every shell script of the repository parses (``bash -n``) and passes shellcheck, including the
per-node script that slurm/train.sh hands to ``srun bash -c '...'`` (a string shellcheck cannot see
inside). shellcheck is a Debian package (``apt-get install shellcheck``; .ci/run installs it); the
shellcheck half skips with that reason where it is missing, ``bash -n`` always runs.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT

SKIP_DIRS = {".venv", ".cache", ".git", "runs", "outputs", "build", "node_modules", "logs"}


def _scripts() -> list[Path]:
    found = [p for p in ROOT.rglob("*.sh") if not SKIP_DIRS & set(p.relative_to(ROOT).parts)]
    ci = ROOT / ".ci" / "run"
    return sorted(found + ([ci] if ci.is_file() else []))


SCRIPTS = _scripts()


def _embedded_node_script(tmp_path: Path) -> Path:
    text = (ROOT / "slurm" / "train.sh").read_text()
    m = re.search(r"^node_script='\n(.*?)\n'$", text, re.S | re.M)
    assert m, "slurm/train.sh: node_script='...' not found"
    p = tmp_path / "train-node-script.sh"
    p.write_text("#!/usr/bin/env bash\n" + m.group(1) + "\n")
    return p


def test_found_the_scripts():
    names = {p.relative_to(ROOT).as_posix() for p in SCRIPTS}
    assert {"slurm/train.sh", "slurm/prep.sh", "slurm/eval.sh", "scripts/env.sh"} <= names, names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_bash_syntax(script):
    p = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def test_bash_syntax_train_node_script(tmp_path):
    p = subprocess.run(["bash", "-n", str(_embedded_node_script(tmp_path))], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def _shellcheck(paths: list[Path]) -> subprocess.CompletedProcess:
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install -y shellcheck; .ci/run installs it)")
    # -x: follow `source` lines (paths are given relative to the repository root, hence cwd=ROOT).
    return subprocess.run(["shellcheck", "-x", "--format=gcc", *map(str, paths)], cwd=ROOT, capture_output=True, text=True)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_shellcheck(script):
    p = _shellcheck([script.relative_to(ROOT)])
    assert p.returncode == 0, f"shellcheck {script.relative_to(ROOT)}:\n{p.stdout}{p.stderr}"


def test_shellcheck_train_node_script(tmp_path):
    p = _shellcheck([_embedded_node_script(tmp_path)])
    assert p.returncode == 0, f"shellcheck (slurm/train.sh node_script):\n{p.stdout}{p.stderr}"
