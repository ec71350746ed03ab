"""What a reader does with a bad record: fail at once, or quarantine it and go on."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from onegen.errors import InputError

MODES = ("fail", "skip")


@dataclass
class ErrorPolicy:
    """``fail`` raises the first InputError; ``skip`` keeps it in ``quarantined`` and the reader moves on.

    A policy can be shared by several readers (e.g. a benchmark file and its KB); ``quarantined``
    then holds the bad records of all of them, each naming its own file.
    """

    mode: str = field(default="fail", metadata={"help": "'fail' raises on the first bad record; 'skip' quarantines it"})
    quarantined: list[InputError] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"error policy mode must be one of {list(MODES)}, got {self.mode!r}")

    @property
    def count(self) -> int:
        return len(self.quarantined)

    def handle(self, err: InputError) -> None:
        """Raise ``err`` (mode fail) or record it (mode skip)."""
        if self.mode == "fail":
            raise err
        self.quarantined.append(err)

    def write(self, path: str | Path) -> Path:
        """Write the quarantine as JSONL: one line per rejected record, with its reason. Atomic."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for err in self.quarantined:
                row = err.as_quarantine() | {"message": str(err)}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
        return path


def resolve_policy(policy: ErrorPolicy | None) -> ErrorPolicy:
    return policy if policy is not None else ErrorPolicy("fail")
