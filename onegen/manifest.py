"""``manifest.json``: what produced a directory, so the next stage can refuse what it cannot use.

Every stage output (prepared dataset, checkpoint, index, results) carries one. ``fingerprint`` is a
content hash that excludes times and paths, so two runs that produce the same bytes have the
same fingerprint whatever happened in between (a kill and a rerun, another machine).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterable

from onegen import __version__
from onegen.errors import ManifestMismatch

MANIFEST_NAME = "manifest.json"


ONEGEN_CONFIG = "onegen_config.json"  # the OneGen side of a model export (pipeline.export writes it)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0600; give the file the mode a plain open() would (0666 minus the umask),
        # so manifests and markers on a shared cluster are readable by the group like their data.
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def fingerprint_files(root: str | Path, files: Iterable[str | Path]) -> str:
    """Hash of (relative path, content hash) of each file, in sorted order."""
    root = Path(root)
    h = hashlib.sha256()
    for f in sorted(str(Path(p)) for p in files):
        h.update(f.encode())
        h.update(sha256_file(root / f).encode())
    return h.hexdigest()


def git_commit(cwd: str | Path | None = None) -> str | None:
    """The commit of the onegen checkout (with ``+dirty`` when modified), or None outside git."""
    cwd = cwd or Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10)
        return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def write_manifest(directory: str | Path, stage: str, *, fingerprint: str, **fields: Any) -> dict:
    """Write ``directory/manifest.json`` atomically and return it."""
    manifest = {
        "stage": stage,
        "fingerprint": fingerprint,
        "onegen_version": __version__,
        "git_commit": git_commit(),
        **fields,
    }
    atomic_write_json(Path(directory) / MANIFEST_NAME, manifest)
    return manifest


def read_manifest(directory: str | Path, expect_stage: str | None = None) -> dict:
    """Read a stage output's manifest; a clear error when it is missing, unreadable or of another stage."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestMismatch(
            f"{directory} has no {MANIFEST_NAME}: it is not a finished onegen output "
            f"(an interrupted run leaves none; rerun the stage that writes it)"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ManifestMismatch(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if expect_stage is not None and manifest.get("stage") != expect_stage:
        raise ManifestMismatch(
            f"{directory} was written by stage {manifest.get('stage')!r}, expected {expect_stage!r}"
        )
    return manifest
