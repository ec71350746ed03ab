"""Shared fixtures: offline environment, the real benchmark samples in ../shared/data, tiny tokenizers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))


def _find_shared_data() -> Path | None:
    env = os.environ.get("ONEGEN_SHARED_DATA")
    candidates = [Path(env)] if env else []
    candidates += [ROOT.parent / "shared" / "data", ROOT.parent.parent / "shared" / "data"]
    for c in candidates:
        if c.is_dir():
            return c
    return None


SHARED_DATA = _find_shared_data()


@pytest.fixture
def shared_data() -> Path:
    """The real benchmark samples; tests that need them skip with the reason where absent."""
    if SHARED_DATA is None:
        pytest.skip("../shared/data (real benchmark samples) is not present; set ONEGEN_SHARED_DATA to point at it")
    return SHARED_DATA


def shared_file(rel: str) -> Path:
    if SHARED_DATA is None:
        pytest.skip("../shared/data (real benchmark samples) is not present; set ONEGEN_SHARED_DATA to point at it")
    p = SHARED_DATA / rel
    if not p.exists():
        pytest.skip(f"{p} is not present in the shared data folder")
    return p


@pytest.fixture(autouse=True)
def _no_leaked_tracking_uri():
    """``mlflow.set_tracking_uri`` exports MLFLOW_TRACKING_URI: never let one test's store reach the next."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


@pytest.fixture(scope="session")
def quickstart_small(tmp_path_factory):
    """One finished ``quickstart --preset tiny --small`` (2.5 min here), shared by the tests that need one: its
    own end-to-end test and the README's commands. ``(out dir, the run's CompletedProcess)``; treat it as
    read-only (copy it to rerun or change it). Run without scripts/env.sh's offline variables: the entry
    points must set them themselves."""
    import subprocess

    from tests.train_fixtures import quickstart_small_cmd, user_env

    out = tmp_path_factory.mktemp("quickstart") / "runs" / "quickstart"
    p = subprocess.run(quickstart_small_cmd(out), cwd=ROOT, env=user_env(), capture_output=True, text=True,
                       timeout=3600)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    return out, p


# The unit tier (`pytest -m unit`): files that test pure parts (roles and labels, the loss, the collator
# and its negatives, the data plan, KV bookkeeping, metrics, bootstrap intervals, mining, config errors).
UNIT_FILES = {"test_roles.py", "test_loss.py", "test_collator.py", "test_plan_kv.py", "test_metrics.py",
              "test_bootstrap.py", "test_mining.py", "test_config.py", "test_config_flags.py"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in UNIT_FILES and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.unit)
