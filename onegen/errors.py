"""Errors a user can act on: every bad-input error names the file, the line and the field."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


class OneGenError(Exception):
    """Base class: an error whose message alone tells the user what to fix."""


def run_cli(command: Callable[[], int], interrupted: str | None = None) -> int:
    """Run a CLI command the way every one of ours ends: a ``OneGenError`` is its message on stderr
    and exit status 2 (no traceback); Ctrl-C prints ``interrupted: <what is kept>`` and exits 130
    (with ``interrupted`` None it propagates as usual)."""
    try:
        return command()
    except OneGenError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if interrupted is None:
            raise
        print(f"interrupted: {interrupted}", file=sys.stderr)
        return 130


@dataclass
class InputError(OneGenError):
    """A record of an input file is unusable.

    ``line`` is 1-based (the line of a JSONL file, or the record index + 1 in a JSON list, said so
    in ``where``); ``field`` is a dotted path inside the record.
    """

    path: str | Path
    line: int | None
    field: str | None
    reason: str
    record_id: str | None = None
    where: str = "line"

    def __post_init__(self) -> None:
        super().__init__(str(self))

    def __reduce__(self):
        # Pickled by a worker of `prepare --num-proc N`: the default (type, args) reduce would call
        # InputError(message) on unpickling, fail, and leave multiprocessing's pool hanging forever.
        return (type(self), (self.path, self.line, self.field, self.reason, self.record_id, self.where))

    def __str__(self) -> str:
        loc = f"{self.path}"
        if self.line is not None:
            loc += f":{self.line}" if self.where == "line" else f" ({self.where} {self.line})"
        parts = [loc]
        if self.record_id is not None:
            parts.append(f"record {self.record_id!r}")
        if self.field is not None:
            parts.append(f"field {self.field!r}")
        return ", ".join(parts) + f": {self.reason}"

    def as_quarantine(self) -> dict:
        return {
            "path": str(self.path),
            "line": self.line,
            "record_id": self.record_id,
            "field": self.field,
            "reason": self.reason,
        }


class ManifestMismatch(OneGenError):
    """An input directory was produced by something this stage cannot use (other tokenizer, model, ...)."""


class ConfigError(OneGenError):
    """A recipe, override or DeepSpeed config is wrong (unknown key, bad type)."""
