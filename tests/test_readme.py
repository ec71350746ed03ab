"""The README's commands exist and parse: the two set-up commands, and every CLI it shows answers --help."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.train_fixtures import ROOT, env

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
        assert len(p.stdout) > 200


def test_every_recipe_and_file_the_readme_names_exists():
    for path in set(re.findall(r"\b((?:configs|ds_configs|docs|slurm|bench|scripts)/[\w.\-]+\.(?:yaml|json|md|sh|py))\b", README)):
        if "*" not in path:
            assert (ROOT / path).exists(), path
