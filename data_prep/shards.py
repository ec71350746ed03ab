"""Arrow shards of the prepared dataset: written atomically, read memory-mapped.

Each shard is one Arrow IPC *stream* file (the format ``datasets`` itself stores), written under a
temporary name and renamed when complete, so a killed run never leaves a file that looks finished.
Reading goes through ``datasets.Dataset.from_file``, which memory-maps: a prepared dataset of any
size opens in milliseconds and costs no RAM until rows are touched.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable

import pyarrow as pa

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


def load_shards(paths: Iterable[str | Path]):
    """Open shards as one memory-mapped ``datasets.Dataset`` (no copy into RAM)."""
    import datasets

    parts = [datasets.Dataset.from_file(str(p)) for p in paths]
    if not parts:
        raise FileNotFoundError("no shards to load")
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
