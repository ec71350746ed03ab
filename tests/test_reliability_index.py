"""Index build killed with SIGKILL at a random point: the rerun completes, gives the same index, and
leaves no half-built directory behind."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time

import pytest

from tests.eval_fixtures import ROOT, random_model, world  # noqa: F401
from tests.train_fixtures import env

pytestmark = pytest.mark.slow


def _cmd(model, data, out) -> list[str]:
    return [sys.executable, "-m", "evaluation", "index", "--model", str(model), "--data", str(data), "--out", str(out),
            "--batch-size", "4", "--quiet"]


def _fingerprint(out) -> str:
    return json.loads((out / "manifest.json").read_text())["fingerprint"]


def test_sigkill_during_index_build_then_rerun(random_model, world, tmp_path):  # noqa: F811
    data = world / "rag_train"
    ref = tmp_path / "ref"
    t0 = time.monotonic()
    subprocess.run(_cmd(random_model, data, ref), cwd=ROOT, env=env(), check=True, capture_output=True)
    full = time.monotonic() - t0
    for seed in range(3):
        out = tmp_path / f"run{seed}"
        proc = subprocess.Popen(_cmd(random_model, data, out), cwd=ROOT, env=env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Seed 0 dies during start-up; the others once the build directory exists (encoding or
        # writing), after a random extra delay.
        if seed == 0:
            time.sleep(0.3 * full)
        else:
            while proc.poll() is None and not list(tmp_path.glob(f".{out.name}.tmp-*")):
                time.sleep(0.005)
            time.sleep(random.Random(seed).uniform(0.0, 0.2))
        proc.kill()
        proc.wait()
        killed_midway = not (out / "manifest.json").exists()
        rerun = subprocess.run(_cmd(random_model, data, out), cwd=ROOT, env=env(), capture_output=True, text=True)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        assert _fingerprint(out) == _fingerprint(ref), f"seed {seed}: the rerun built a different index"
        leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(f".{out.name}.")]
        assert leftovers == [], f"seed {seed}: stale build directories {leftovers}"
        print(f"seed {seed}: killed {'mid-build' if killed_midway else 'after the build'}; rerun gave the same index")
