"""Open benchmark JSON files (a JSON list or JSON Lines, gzipped or not) and walk their records.

Every record comes with its 1-based position: the line of a JSONL file, or the record index + 1
of a JSON list (``where="record"``), so any later error can name file, line and field. The format
is sniffed from the content, not the suffix: several real files are JSON Lines named ``.json``
(AMOR's HotpotQA ``test.json``, 2Wiki's ``id_aliases.json``). A UTF-8 byte-order mark at the start
of a file is read as ``utf-8-sig`` does (skipped). A gzip file that ends early (an interrupted
download) or is corrupt is one named error, not an ``EOFError`` traceback.
"""

from __future__ import annotations

import gzip
import io
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from onegen.errors import ConfigError, InputError, OneGenError

from .errors import ErrorPolicy, resolve_policy

GZIP_MAGIC = b"\x1f\x8b"
_TYPE_NAMES = {str: "string", int: "integer", float: "number", list: "list", dict: "object", bool: "boolean", type(None): "null"}


def open_binary(path: str | Path) -> IO[bytes]:
    """Open ``path`` for reading bytes, gunzipping transparently (detected by the gzip magic bytes)."""
    path = Path(path)
    check_input_file(path)
    with open(path, "rb") as f:
        magic = f.read(2)
    return gzip.open(path, "rb") if magic == GZIP_MAGIC else open(path, "rb")


def open_text(path: str | Path) -> IO[str]:
    """Open ``path`` as UTF-8 text (a leading byte-order mark skipped), gunzipping transparently."""
    return io.TextIOWrapper(open_binary(path), encoding="utf-8-sig")


def check_input_file(path: str | Path, flag: str | None = None) -> None:
    """Raise the user's error when ``path`` is not a readable file: missing, or a directory.

    ``flag`` names the option that took it (``--input``) in the directory message, which lists a
    few JSON files inside as candidates."""
    path = Path(path)
    if path.is_dir():
        takes = f"{flag} takes a file" if flag else "give a file"
        found = _json_files_in(path)
        hint = ""
        if found:
            more = f", ... ({len(found)} in all)" if len(found) > 3 else ""
            hint = f" (did you mean {' or '.join(map(str, found[:3]))}{more}?)"
        raise ConfigError(f"{path}/ is a directory; {takes}{hint}")
    if not path.is_file():
        raise InputError(path, None, None, "file not found")


def _json_files_in(directory: Path) -> list[Path]:
    """JSON / JSON Lines files (gzipped or not) in ``directory``, else one level below, sorted."""
    suffixes = (".json", ".jsonl", ".json.gz", ".jsonl.gz")
    for pattern in ("*", "*/*"):
        found = sorted(p for p in directory.glob(pattern) if p.is_file() and p.name.endswith(suffixes))
        if found:
            return found
    return []


def _gzip_error(path: Path, e: Exception) -> OneGenError:
    size = path.stat().st_size
    shown = f"{size} bytes" if size < 1000 else f"{size / 1e3:.1f} kB" if size < 1e6 else f"{size / 1e6:.1f} MB"
    if isinstance(e, EOFError):
        return OneGenError(f"{path} is truncated (gzip stream ended early after {shown}): re-download it")
    return OneGenError(f"{path} is not a readable gzip file ({e}): re-download it")


def _type_name(types: type | tuple[type, ...]) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)


def is_instance(value: Any, types: type | tuple[type, ...]) -> bool:
    """isinstance, except that a JSON boolean is not an integer."""
    types = types if isinstance(types, tuple) else (types,)
    if isinstance(value, bool) and bool not in types:
        return False
    return isinstance(value, types)


@dataclass
class RawRecord:
    """One JSON object of an input file, with where it came from."""

    data: dict[str, Any]
    path: str | Path
    line: int
    where: str = "line"
    record_id: str | None = None

    def error(self, field: str | None, reason: str) -> InputError:
        return InputError(self.path, self.line, field, reason, record_id=self.record_id, where=self.where)

    def check(self, value: Any, types: type | tuple[type, ...], field: str) -> Any:
        """Return ``value`` if it has one of ``types``, else raise an InputError naming ``field``."""
        if not is_instance(value, types):
            got = _TYPE_NAMES.get(type(value), type(value).__name__)
            raise self.error(field, f"expected {_type_name(types)}, got {got} {_short(value)}")
        return value

    def get(self, name: str, types: type | tuple[type, ...], *, required: bool = True, default: Any = None) -> Any:
        """Top-level field ``name``, type-checked; a missing required field is an InputError."""
        if name not in self.data:
            if required:
                raise self.error(name, "missing field")
            return default
        return self.check(self.data[name], types, name)

    def fixed_lists(self, name: str, shape: str, size: int) -> Iterator[tuple[str, list]]:
        """The items of required list field ``name``, each a list of ``size`` (``shape`` shows it in the
        error, e.g. "[title, sent_id]"), with its place ("context[3]"); checked one at a time, in order."""
        for i, item in enumerate(self.get(name, list)):
            where = f"{name}[{i}]"
            self.check(item, list, where)
            if len(item) != size:
                raise self.error(where, f"expected {shape}, got a list of {len(item)} items")
            yield where, item

    def text(self, name: str) -> str:
        """A required, non-empty (after stripping) string field."""
        value = self.get(name, str)
        if not value.strip():
            raise self.error(name, "empty text")
        return value


def _short(value: Any, limit: int = 60) -> str:
    s = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _first_significant_byte(path: Path) -> bytes:
    with open_binary(path) as f:
        while chunk := f.read(4096):
            stripped = chunk.lstrip()
            if stripped.startswith(b"\xef\xbb\xbf"):  # UTF-8 BOM
                stripped = stripped[3:].lstrip()
            if stripped:
                return stripped[:1]
    return b""


def iter_records(path: str | Path, policy: ErrorPolicy | None = None) -> Iterator[RawRecord]:
    """Yield every JSON object of ``path`` (a JSON list, or JSON Lines) with its 1-based position.

    A malformed JSONL line or a record that is not an object goes to ``policy`` (fail raises; skip
    quarantines and continues). A malformed JSON *list* makes the whole file unreadable: always raised.
    """
    path = Path(path)
    policy = resolve_policy(policy)
    try:
        if _first_significant_byte(path) == b"[":
            yield from _iter_json_list(path, policy)
        else:
            yield from _iter_json_lines(path, policy)
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:  # only gzip reads raise these here
        raise _gzip_error(path, e) from None


def _iter_json_list(path: Path, policy: ErrorPolicy) -> Iterator[RawRecord]:
    try:
        with open_text(path) as f:
            data = json.loads(f.read())
    except json.JSONDecodeError as e:
        raise InputError(path, e.lineno, None, f"malformed JSON: {e.msg} (column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise InputError(path, None, None, f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not isinstance(data, list):
        raise InputError(path, None, None, "expected a JSON list of records")
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            policy.handle(InputError(path, i + 1, None, f"record is not a JSON object: {_short(item)}", where="record"))
            continue
        yield RawRecord(item, path, i + 1, where="record")


def _iter_json_lines(path: Path, policy: ErrorPolicy) -> Iterator[RawRecord]:
    with open_binary(path) as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8").lstrip("\ufeff").strip()
            except UnicodeDecodeError as e:
                policy.handle(InputError(path, lineno, None, f"not UTF-8 text ({e.reason})"))
                continue
            if not line:
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                hint = " (read as JSON Lines: one object per line)" if lineno == 1 and line == "{" else ""
                policy.handle(InputError(path, lineno, None, f"malformed JSON: {e.msg} (column {e.colno}){hint}"))
                continue
            if not isinstance(item, dict):
                policy.handle(InputError(path, lineno, None, f"record is not a JSON object: {_short(item)}"))
                continue
            yield RawRecord(item, path, lineno)
