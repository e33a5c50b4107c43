"""Command-line options from typed sources: config dataclasses, `Literal` choices and method options.

Every command that exposes a frozen config dataclass (`TrainConfig`, `FreeLMConfig`, `ReaderConfig`,
`ServeSettings`) gets its flags from `add_config_options`: one flag per field, named after it
(`batch_size` -> `--batch-size`), its help the string written after the field plus the default. A
`bool` field gets both forms (`--fast-dropout` / `--no-fast-dropout`), so a default of true can be
switched off; a `Literal` field's choices are `typing.get_args` of its annotation, the same tuple the
library validates against. Every flag defaults to None, so only what the user typed overrides the
config, and `config_from_options` builds the config through `build_config`, which parses the strings
and collects every problem into one error.

Method options have one syntax, `KEY=VALUE`, parsed by `method_options_from`: `deltatune train` takes
them as `--method.KEY=VALUE`, a compare grid on the command line as `NAME:KEY=VALUE,KEY=VALUE`. Either
way the values reach `build_method`, whose errors name the method's valid options.

argparse is used directly rather than jsonargparse: jsonargparse would rename the existing flags'
error messages and help layout and add a dependency for what is a 100-line generator here.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

from deltatune.config import build_config, field_help
from deltatune.errors import DeltatuneError

METHOD_FLAG = "--method."
"""How `deltatune train` and `deltatune freelm train` spell a method option: --method.KEY=VALUE."""


def literal_choices(annotation: Any) -> tuple | None:
    """The values a `Literal` annotation allows (also inside `X | None` or `tuple[Literal[...], ...]`);
    None when the annotation holds no Literal."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType, tuple):
        for argument in typing.get_args(annotation):
            choices = literal_choices(argument)
            if choices is not None:
                return choices
    return None


def flag_name(field_name: str) -> str:
    """`batch_size` -> `--batch-size`."""
    return "--" + field_name.replace("_", "-")


def add_switch(parser, *flags: str, help: str | None = None, default: bool | None = False, **extra: Any) -> None:
    """A boolean option with its `--no-` form (`--json` / `--no-json`); argparse's help shows the default."""
    parser.add_argument(*flags, action=argparse.BooleanOptionalAction, default=default, help=help, **extra)


def _shown_default(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "none"
    return str(value)


def _field_default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def add_config_options(
    parser,
    config_class: type,
    dest_prefix: str = "",
    skip: typing.Collection[str] = (),
    notes: dict[str, str] | None = None,
) -> None:
    """One flag per field of `config_class` on `parser` (a parser or argument group).

    The value lands in `args.<dest_prefix><field>` and is None unless typed. `skip` names fields that get
    no flag; `notes` replaces a field's "(default: ...)" note (e.g. to name an environment variable).
    """
    helps = field_help(config_class)
    hints = typing.get_type_hints(config_class)
    notes = notes or {}
    for field in dataclasses.fields(config_class):
        if field.name in skip or not field.init:
            continue
        hint = hints[field.name]
        default = _field_default(field)
        note = notes.get(field.name, f"(default: {_shown_default(default)})")
        options: dict[str, Any] = {"dest": dest_prefix + field.name, "default": None}
        choices = literal_choices(hint)
        if hint is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(hint) is typing.Literal:
            options["choices"] = choices
        else:
            options["metavar"] = "VALUE"
            if choices is not None:  # a list of choices, or a choice beside other values: build_config checks it
                note = f"(choices: {', '.join(map(str, choices))}) {note}"
        text = f"{helps.get(field.name, '')} {note}".strip().replace("%", "%%")  # argparse formats help with %
        parser.add_argument(flag_name(field.name), help=text, **options)


def config_from_options(
    config_class: type, args: argparse.Namespace, dest_prefix: str = "", values: dict[str, Any] | None = None
) -> Any:
    """`config_class` built from the flags the user typed (see `add_config_options`), laid over `values`;
    every problem is reported at once (`--epochs='x': must be a number`)."""
    overrides = dict(values or {})
    for field in dataclasses.fields(config_class):
        typed = getattr(args, dest_prefix + field.name, None)
        if typed is not None:
            overrides[field.name] = typed
    return build_config(config_class, overrides, prefix="--")


def typed_options(args: argparse.Namespace, dest_prefix: str) -> dict[str, Any]:
    """The options under `dest_prefix` the user typed, keyed by field name."""
    return {
        name[len(dest_prefix) :]: value
        for name, value in vars(args).items()
        if name.startswith(dest_prefix) and value is not None
    }


def split_method_options(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """Pull `--method.KEY=VALUE` / `--method.KEY VALUE` out of argv before argparse sees it."""
    rest: list[str] = []
    items: list[str] = []
    index = 0
    while index < len(argv):
        argument = argv[index]
        if argument.startswith(METHOD_FLAG):
            item = argument[len(METHOD_FLAG) :]
            if "=" not in item:
                if index + 1 >= len(argv):
                    raise DeltatuneError(f"{argument} needs a value, e.g. {argument}=4")
                index += 1
                item = f"{item}={argv[index]}"
            items.append(item)
        else:
            rest.append(argument)
        index += 1
    return rest, method_options_from(items, where=METHOD_FLAG + "KEY=VALUE", example="--method.r=16")


def method_options_from(items: typing.Iterable[str], where: str, example: str) -> dict[str, str]:
    """`KEY=VALUE` items as a mapping of method options (values stay text; `build_method` parses them).

    An item without `=` continues the previous value after a comma, so a list option reads the same in
    both syntaxes: `--method.targets=query,value` and `lora:targets=query,value,r=4`.
    """
    options: dict[str, str] = {}
    last_key = None
    for item in items:
        key, equals, value = item.partition("=")
        if equals and key.strip():
            last_key = key.strip()
            options[last_key] = value.strip()
        elif last_key is not None and not equals:
            options[last_key] = f"{options[last_key]},{item}".strip()
        else:
            raise DeltatuneError(
                f"{where}: option {item!r} needs KEY=VALUE, e.g. {example} "
                "(`deltatune methods -v` lists each method's options)"
            )
    return options


def parse_method_text(text: str) -> dict | str:
    """A method on the command line of `compare --methods`: `NAME`, `NAME:KEY=VALUE,...` or
    `LABEL=NAME:KEY=VALUE,...` (e.g. `lora-r16=lora:r=16,alpha=32`), as a grid spec's method entry."""
    head, _, options = text.partition(":")
    label, equals, method = head.partition("=")
    if not equals:
        label, method = head, head
    if not options:
        return method if label == method else {"name": label, "method": method}
    config = method_options_from(options.split(","), where=f"--methods {text!r}", example="lora-r16=lora:r=16")
    return {"name": label, "method": method, "config": config}


__all__ = [
    "METHOD_FLAG",
    "add_config_options",
    "add_switch",
    "config_from_options",
    "flag_name",
    "literal_choices",
    "method_options_from",
    "parse_method_text",
    "split_method_options",
    "typed_options",
]
