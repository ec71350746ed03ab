"""Arrow shards of the prepared dataset: written atomically (``data_prep``), read memory-mapped (the
trainer, evaluation, ``data_prep inspect``).

Each shard is one Arrow IPC *stream* file (the format ``datasets`` itself stores), written under a
temporary name and renamed when complete, so a killed run never leaves a file that looks finished.
Reading goes through ``datasets.Dataset.from_file``, which memory-maps: a prepared dataset of any
size opens in milliseconds and costs no RAM until rows are touched.

Before a stage reads a prepared dataset, ``verify_shards`` checks the shard files against the
manifest (the same names, the same byte sizes): a truncated, missing, extra or replaced shard is
refused with its path. Sizes, not hashes: hashing every shard on every open would read the whole
dataset on every rank; the sha256 of each shard stays in the manifest for a full check.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable

import pyarrow as pa

from onegen.errors import ManifestMismatch

SHARD_PATTERN = "shard-{:05d}.arrow"


def shard_path(directory: str | Path, index: int) -> Path:
    return Path(directory) / SHARD_PATTERN.format(index)


def write_shard(path: str | Path, rows: list[dict], schema: pa.Schema) -> int:
    """Write ``rows`` (dicts with exactly the schema's columns) to ``path`` atomically; return bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows, schema=schema)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            writer.write_table(table, max_chunksize=1000)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path.stat().st_size


def list_shards(directory: str | Path) -> list[Path]:
    """Complete shards only (temporary files of an interrupted write start with a dot)."""
    return sorted(Path(directory).glob("shard-*.arrow"))


def remove_stale_temporaries(directory: str | Path) -> int:
    """Delete half-written temporaries left by a killed run; return how many."""
    n = 0
    for p in Path(directory).glob(".shard-*.tmp"):
        p.unlink(missing_ok=True)
        n += 1
    return n


def verify_shards(directory: str | Path, manifest: dict) -> None:
    """The shards of a prepared dataset must be exactly those its manifest lists, with the same sizes.

    Raises ``ManifestMismatch`` naming the shard: truncated or rewritten (size differs), missing,
    or not listed (e.g. copied in from another run).
    """
    directory = Path(directory)
    listed = manifest.get("shards")
    if not isinstance(listed, dict):
        return  # a manifest of another layout: the row counts are still checked by the reader
    for sub, entries in sorted(listed.items()):
        want = {e["name"]: e for e in entries}
        have = {p.name: p for p in list_shards(directory / sub)}
        for name in sorted(set(want) - set(have)):
            raise ManifestMismatch(f"{directory / sub / name}: listed in manifest.json but missing; "
                                   f"the prepared dataset is incomplete: prepare it again")
        for name in sorted(set(have) - set(want)):
            raise ManifestMismatch(f"{have[name]}: not listed in manifest.json (a shard of another run?); "
                                   f"remove it or prepare the dataset again")
        for name, entry in sorted(want.items()):
            size = have[name].stat().st_size
            if "bytes" in entry and size != entry["bytes"]:
                raise ManifestMismatch(
                    f"{have[name]}: {size} bytes but manifest.json records {entry['bytes']} (sha256 "
                    f"{str(entry.get('sha256', '?'))[:12]}): the shard was truncated, modified or replaced after "
                    f"prep; prepare the dataset again")


def load_shards(paths: Iterable[str | Path]):
    """Open shards as one memory-mapped ``datasets.Dataset`` (no copy into RAM).

    A file that is not a readable Arrow stream is a ``ManifestMismatch`` naming it (not a pyarrow
    traceback).
    """
    # heavy (datasets): imported where shards are opened
    import datasets

    parts = []
    for p in paths:
        try:
            parts.append(datasets.Dataset.from_file(str(p)))
        except (pa.ArrowException, OSError, ValueError) as e:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ManifestMismatch(f"{p}: not a readable Arrow shard ({reason}); prepare the dataset again") from None
    if not parts:
        raise FileNotFoundError("no shards to load")
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
