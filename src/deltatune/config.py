"""Frozen dataclass configs built from user overrides (CLI strings or YAML values).

Every config in deltatune is a frozen dataclass whose fields carry their help text as a string
literal right after the field (the attribute-docstring convention). `build_config` turns a
mapping of overrides into an instance, converting strings to the field's type, and collects every
problem (unknown key, bad value) into one error instead of failing on the first.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import textwrap
import types
import typing
from typing import Any

from deltatune.errors import DeltatuneError, did_you_mean

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def field_help(config_class: type) -> dict[str, str]:
    """Field name -> the string literal written just after it in the class body (its help); a field
    a config inherits keeps the help its base class gives it."""
    helps: dict[str, str] = {}
    for klass in reversed(config_class.__mro__):
        if dataclasses.is_dataclass(klass):
            helps.update(_own_field_help(klass))
    return helps


def _own_field_help(config_class: type) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(config_class))
    except (OSError, TypeError):
        return {}
    definition = ast.parse(source).body[0]
    if not isinstance(definition, ast.ClassDef):
        return {}
    body = definition.body
    helps: dict[str, str] = {}
    for statement, following in zip(body, [*body[1:], None], strict=True):
        if (
            isinstance(statement, ast.AnnAssign)
            and isinstance(statement.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            helps[statement.target.id] = " ".join(following.value.value.split())
    return helps


def _convert(value: Any, annotation: Any) -> Any:
    """`value` as `annotation`; strings from the command line are parsed, other values checked."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            if type(None) in args:
                return None
        errors = []
        for option in args:
            if option is type(None):
                continue
            try:
                return _convert(value, option)
            except (ValueError, TypeError) as error:
                errors.append(str(error))
        raise ValueError("; ".join(errors))
    if origin is typing.Literal:
        if value not in args:
            raise ValueError(f"must be one of {', '.join(map(repr, args))}")
        return value
    if origin in (tuple, list):
        item_type = args[0] if args else str
        if isinstance(value, str):
            items = [item.strip() for item in value.split(",") if item.strip()]
        elif isinstance(value, (list, tuple)):
            items = list(value)
        else:
            items = [value]
        return tuple(_convert(item, item_type) for item in items)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ValueError("must be true or false")
    if annotation is int:
        if isinstance(value, bool):
            raise ValueError("must be a whole number")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ValueError("must be a whole number")
    if annotation is float:
        if isinstance(value, bool):
            raise ValueError("must be a number")
        try:
            number = float(value)
        except (TypeError, ValueError, OverflowError):
            raise ValueError("must be a number") from None
        if not math.isfinite(number):  # nan slips through every `x <= 0` check; inf overflows step counts
            raise ValueError("must be a finite number")
        return number
    if annotation is str:
        if isinstance(value, (dict, list, tuple)):
            raise ValueError("must be text")
        return str(value)
    return value


def build_config(config_class: type, overrides: dict[str, Any], prefix: str = "") -> Any:
    """An instance of `config_class` with `overrides` applied; every problem reported at once.

    `prefix` is how the user wrote the keys (e.g. 'method.' for `--method.r=4`), so errors
    quote the key back as typed.
    """
    hints = typing.get_type_hints(config_class)
    fields = {f.name: f for f in dataclasses.fields(config_class) if f.init}
    values: dict[str, Any] = {}
    problems: list[str] = []
    for key, raw in overrides.items():
        name = key.replace("-", "_")
        if name not in fields:
            problems.append(f"unknown key {prefix}{key}. {did_you_mean(name, fields)}")
            continue
        try:
            values[name] = _convert(raw, hints[name])
        except ValueError as error:
            problems.append(f"{prefix}{key}={raw!r}: {error}")
    if not problems:
        try:
            return config_class(**values)
        except DeltatuneError as error:  # __post_init__ validation
            problems.append(str(error))
        except (TypeError, ValueError) as error:
            problems.append(str(error))
    raise DeltatuneError(f"Invalid {config_class.__name__}: " + "\n  ".join(["", *problems]))


def choice_problems(config: Any) -> list[str]:
    """`name='value' must be one of a, b, c` for each `Literal` field of a config whose value is not one of
    `typing.get_args` of its annotation: the same choices the command line offers."""
    hints = typing.get_type_hints(type(config))
    problems = []
    for config_field in dataclasses.fields(config):
        annotation = hints[config_field.name]
        value = getattr(config, config_field.name)
        if typing.get_origin(annotation) is typing.Literal and value not in typing.get_args(annotation):
            problems.append(
                f"{config_field.name}={value!r} must be one of {', '.join(map(str, typing.get_args(annotation)))}"
            )
    return problems


def describe_fields(config_class: type) -> list[tuple[str, str, Any, str]]:
    """(name, type, default, help) for every field: what `--help` and `deltatune methods` print."""
    hints = typing.get_type_hints(config_class)
    helps = field_help(config_class)
    rows = []
    for f in dataclasses.fields(config_class):
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else (f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        )
        type_name = getattr(hints[f.name], "__name__", None) or str(hints[f.name]).replace("typing.", "")
        rows.append((f.name, type_name, default, helps.get(f.name, "")))
    return rows


def to_jsonable(config: Any) -> dict:
    """A config as plain JSON values (tuples become lists)."""
    return json_ready(dataclasses.asdict(config))


def json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value
