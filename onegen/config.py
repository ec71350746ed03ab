"""Typed configs: dataclasses loaded from a YAML recipe, overridable with ``key=value`` arguments.

Unknown keys are an error that names the key, the file and the fields that exist (a typo in a
recipe must never be silently ignored). Nested dataclasses are addressed with dots:
``train.lr=1e-4``. Values of overrides are parsed as YAML scalars (``true``, ``3``, ``1e-4``, ``[1,2]``).

Errors say where the bad value came from: ``RECIPE:LINE, field 'optim.max_step': unknown field ...``
for a recipe (the line of the key in the YAML file), ``override optim.max_steps: expected an
integer, got 'abc'`` for a ``key=value`` argument (checked before the recipe is merged, so a bad
override is never blamed on the recipe).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from onegen.errors import ConfigError

T = TypeVar("T")


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert ``value`` to ``tp`` for the simple types recipes use."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(e)
        if len(errors) > 1:  # e.g. int | Literal["auto"]: name every accepted form
            accepted = " or ".join(_type_word(a) for a in args if a is not type(None))
            raise FieldError(where, f"expected {accepted}, got {value!r}")
        if errors:
            raise errors[0]
        raise FieldError(where, f"bad value {value!r}")
    if tp is Any:
        return value
    if _is_dataclass_type(tp):
        if isinstance(tp, type) and isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise FieldError(where, f"expected a mapping of {tp.__name__} fields, got {value!r}")
        return _from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise FieldError(where, f"expected a list, got {value!r}")
        (arg,) = typing.get_args(tp)[:1] or (Any,)
        return [_coerce(v, arg, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise FieldError(where, f"expected a mapping, got {value!r}")
        return dict(value)
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise FieldError(where, f"{value!r} is not one of {list(allowed)}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise FieldError(where, f"expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise FieldError(where, f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise FieldError(where, f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise FieldError(where, f"expected a string, got {value!r}")
    if tp is Path:
        if isinstance(value, (str, Path)) and str(value):
            return Path(value)
        raise FieldError(where, f"expected a path, got {value!r}")
    return value


def _type_word(tp: Any) -> str:
    """How an error names a type: ``an integer``, ``one of ['auto']``."""
    if typing.get_origin(tp) is typing.Literal:
        return f"one of {list(typing.get_args(tp))}"
    words = {int: "an integer", float: "a number", str: "a string", bool: "true/false", Path: "a path"}
    return words.get(tp, getattr(tp, "__name__", str(tp)))


class FieldError(ConfigError):
    """A bad value (or an unknown key) at the dotted path ``field``; ``reason`` says what is wrong."""

    def __init__(self, field: str, reason: str, source: str | None = None) -> None:
        self.field, self.reason = field, reason
        super().__init__(f"{source}, field {field!r}: {reason}" if source else f"{field}: {reason}")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _unknown_reason(cls: type, key: str) -> str:
    names = list(_field_types(cls))
    close = difflib.get_close_matches(key, names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown field {key!r} for {cls.__name__}{hint}; known fields: {', '.join(names)}"


def _from_dict(cls: type[T], data: dict[str, Any], path: str) -> T:
    types_ = _field_types(cls)
    kwargs = {}
    for key, value in (data or {}).items():
        if key not in types_:
            raise FieldError(_join(path, key), _unknown_reason(cls, key))
        kwargs[key] = _coerce(value, types_[key], _join(path, key))
    for f in dataclasses.fields(cls):
        if f.init and f.name not in kwargs and f.default is dataclasses.MISSING \
                and f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
            raise FieldError(_join(path, f.name), "required and not set: give its flag, a recipe key or key=value")
    return cls(**kwargs)


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config", lines: dict[str, int] | None = None) -> T:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and bad types with a clear message.

    ``where`` names the source: a label such as ``mining`` (message ``mining.a.b: reason``) or, with
    ``lines`` (dotted field path -> line of that key in the file), a recipe file (message
    ``FILE:LINE, field 'a.b': reason``).
    """
    try:
        return _from_dict(cls, data, "")
    except FieldError as e:
        raise _located(e, where, lines) from None


def _located(e: FieldError, where: str, lines: dict[str, int] | None) -> ConfigError:
    """``e`` restated with its source: ``where.field: reason``, or ``FILE:LINE, field 'f': reason``."""
    if lines is None:
        return ConfigError(f"{where}.{e.field}: {e.reason}")
    line = _line_of(lines, e.field)
    return FieldError(e.field, e.reason, f"{where}:{line}" if line else where)


def _line_of(lines: dict[str, int], field: str) -> int | None:
    """The line of ``field`` in the recipe, or of its nearest enclosing key (``a.b[2]`` -> ``a.b``)."""
    key = field.split("[", 1)[0]
    while key:
        if key in lines:
            return lines[key]
        key = key.rpartition(".")[0]
    return None


def _yaml_key_lines(text: str) -> dict[str, int]:
    """Dotted key path -> 1-based line of that key, for every mapping key of a YAML document."""
    out: dict[str, int] = {}

    def walk(node: Any, path: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode):
                    sub = _join(path, str(k.value))
                    out.setdefault(sub, k.start_mark.line + 1)
                    walk(v, sub)

    try:
        walk(yaml.compose(text, Loader=yaml.SafeLoader), "")
    except yaml.YAMLError:
        pass
    return out


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def apply_overrides(data: dict[str, Any], overrides: list[str], cls: type) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides onto a raw mapping, each checked against ``cls`` on its own: an
    unknown key or a value of the wrong type is reported as the override's, never the recipe's."""
    data = _deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value (e.g. train.lr=1e-4)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not a YAML scalar or list "
                              f"({getattr(e, 'problem', None) or e})") from None
        key = key.strip()
        parts = key.split(".")
        node, node_cls = data, cls
        for i, part in enumerate(parts):
            types_ = _field_types(node_cls)
            if part not in types_:
                raise ConfigError(f"override {key}: {_unknown_reason(node_cls, part)}")
            if i == len(parts) - 1:
                try:
                    value = _coerce(value, types_[part], key)
                except FieldError as e:
                    raise ConfigError(f"override {e.field}: {e.reason}") from None
                if dataclasses.is_dataclass(value) and not isinstance(value, type):
                    value = dataclasses.asdict(value)
                node[part] = value
            else:
                sub = types_[part]
                if not _is_dataclass_type(sub):
                    raise ConfigError(f"override {key}: {part!r} is not a section (it has no field {parts[i + 1]!r})")
                node = node.setdefault(part, {})
                if dataclasses.is_dataclass(node):
                    node = dataclasses.asdict(node)
                node_cls = sub
    return data


def _deepcopy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Load ``cls`` from a YAML recipe (optional) plus overrides."""
    data: dict[str, Any] = {}
    lines: dict[str, int] | None = None
    where = "config"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"recipe {path} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            loc = f"{path}:{mark.line + 1}" if mark is not None else str(path)
            raise ConfigError(f"{loc}: not valid YAML: {getattr(e, 'problem', None) or e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        where, lines = str(path), _yaml_key_lines(text)
    data = apply_overrides(data, overrides or [], cls)
    try:
        return _from_dict(cls, data, "")
    except FieldError as e:
        # a value check (a dataclass's __post_init__) may fail on a value an override set: blame it
        overridden = {o.split("=", 1)[0].strip(): o for o in overrides or [] if "=" in o}
        if e.field in overridden:
            raise ConfigError(f"override {overridden[e.field]!r}: {e.reason}") from None
        raise _located(e, where, lines) from None



def dump_yaml(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False)


def help_text(cls: type, prefix: str = "") -> str:
    """One line per field (dotted), with type, default and the field's help metadata."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if _is_dataclass_type(tp):
            lines.append(help_text(tp, prefix + f.name + "."))
            continue
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = repr(f.default_factory())  # type: ignore[misc]
        else:
            default = "(required)"
        doc = f.metadata.get("help", "")
        lines.append(f"  {prefix}{f.name} = {default}    {doc}")
    return "\n".join(lines)
