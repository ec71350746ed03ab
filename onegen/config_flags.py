"""Command-line flags made from a config dataclass, so each option and its default exist once.

A stage's options are the fields of its dataclass (``onegen.config``): the type says how a flag
parses (a ``Literal`` gives the choices), the field's ``help`` metadata is the flag's help, and the
default is the field's. A flag that is given becomes a ``key=value`` override, applied after the
recipe (``--config``) and before the positional ``key=value`` arguments, so all three meet in
one typed load with the same ``FILE:LINE, field`` errors.

Field metadata the flags read:
  ``help``   what the flag does (the default is appended)
  ``flags``  the option strings (default ``--field-name``; a bool that defaults to true gets
             ``--no-field-name``); ``()``: no flag, set in a recipe or as ``key=value`` only
  ``flag_help``  the flag's help where it differs from the field's (a flag that turns a default off)
  ``flat``   on a section (a dataclass field): its scalar fields get flags of their own names
             (``--nprobe`` sets ``faiss.nprobe``)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any


def _plain(tp: Any) -> Any:
    """``X | None`` -> ``X``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def _dest(name: str) -> str:
    return f"cfg__{name}"


def _flag_fields(cls: type, prefix: str = "") -> list[tuple[str, dataclasses.Field, Any]]:
    """(dotted key, field, plain type) of every field that has a flag: scalars, and the scalars of a
    section marked ``flat`` (``faiss.nprobe`` -> ``--nprobe``); not other sections, lists or mappings."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = _plain(hints[f.name])
        if dataclasses.is_dataclass(tp) and f.metadata.get("flat"):
            out += _flag_fields(tp, f"{prefix}{f.name}.")
            continue
        compound = tp in (list, dict, tuple) or typing.get_origin(tp) in (list, dict, tuple)
        if f.metadata.get("flags") == () or dataclasses.is_dataclass(tp) or compound:
            continue
        out.append((prefix + f.name, f, tp))
    return out


def _default_words(f: dataclasses.Field) -> str:
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
        return "required"
    if f.default is None or f.default == "":
        return ""
    if isinstance(f.default, bool):
        return ""  # said by the flag's name
    return f"default: {f.default}"


def add_config_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """A flag on ``parser`` for every scalar field of ``cls`` (see the module docstring)."""
    for key, f, tp in _flag_fields(cls):
        dash = f.name.replace("_", "-")
        kw: dict[str, Any] = {"dest": _dest(key), "default": None}
        if tp is bool:
            names = f.metadata.get("flags") or ((f"--no-{dash}",) if f.default is True else (f"--{dash}",))
            kw.update(action="store_const", const=not f.default)
        else:
            names = f.metadata.get("flags") or (f"--{dash}",)
            kw["metavar"] = {int: "N", float: "X", Path: "PATH"}.get(tp, f.name.upper())
            if typing.get_origin(tp) is typing.Literal:
                kw["choices"], kw["metavar"] = list(typing.get_args(tp)), None
            elif tp in (int, float):
                kw["type"] = tp
        default = _default_words(f)
        kw["help"] = f.metadata.get("flag_help") or f.metadata.get("help", "")
        kw["help"] += f" [{default}]" if default else ""
        parser.add_argument(*names, **kw)


def flag_overrides(ns: argparse.Namespace, cls: type) -> list[str]:
    """``key=value`` overrides of the flags given on the command line (JSON values: also YAML)."""
    out = []
    for key, _, _ in _flag_fields(cls):
        value = getattr(ns, _dest(key), None)
        if value is not None:
            out.append(f"{key}={json.dumps(str(value) if isinstance(value, Path) else value)}")
    return out
