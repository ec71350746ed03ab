"""What a reader does with a bad record: fail at once, or quarantine it and go on."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from onegen.errors import InputError

if TYPE_CHECKING:
    from .jsonio import RawRecord

T = TypeVar("T")

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


class RecordPass:
    """One reader's pass over its records under ``policy``: each record parsed, one that fails or repeats
    an earlier record's id handed to the policy (raised, or quarantined and passed over), and the notes
    that end every reader's Dataset: what its records counted, then how many records were quarantined
    since the pass began (a KB or db the reader reads with the same policy counts too)."""

    def __init__(self, policy: ErrorPolicy) -> None:
        self.policy = policy
        self.tally: Counter = Counter()  # note stem -> count over the records kept ("3 <stem>")
        self.quarantined_before = policy.count

    def parse(
        self,
        records: Iterable[RawRecord],
        parse: Callable[[RawRecord, Counter], T],
        record_id: Callable[[T], str],
        id_field: str,
        duplicate: str,
    ) -> Iterator[T]:
        """``parse(rec, tally)`` of each good record, whose ``tally`` then counts in ``self.tally``. A
        record whose ``record_id`` came before is an error at ``id_field``; ``duplicate`` is its reason,
        with ``{where}`` and ``{line}`` of the first one."""
        first_seen: dict[str, int] = {}
        for rec in records:
            tally: Counter = Counter()
            try:
                parsed = parse(rec, tally)
                key = record_id(parsed)
                if key in first_seen:
                    raise rec.error(id_field, duplicate.format(where=rec.where, line=first_seen[key]))
            except InputError as err:
                self.policy.handle(err)
                continue
            first_seen[key] = rec.line
            self.tally.update(tally)
            yield parsed

    def tally_notes(self) -> list[str]:
        return [f"{n} {stem}" for stem, n in sorted(self.tally.items())]

    def quarantine_notes(self) -> list[str]:
        n = self.policy.count - self.quarantined_before
        return [f"{n} records quarantined (error policy skip)"] if n > 0 else []
