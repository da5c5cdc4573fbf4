"""Command-line flags generated from a config dataclass, as litgpt and TRL (``HfArgumentParser``) do.

A field's flag is ``--name-with-dashes`` (or ``metadata["flag"]``); its type, choices and default come
from the annotation and the default, its help from ``metadata["help"]``. A field with no help has no
flag (a nested dict, say, set through a JSON config file instead).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Literal


def config_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per documented field of the dataclass ``cls``.

    Every flag's value is None unless given (a bool is a ``store_true`` switch), so ``given_fields``
    can tell what the command line set from what it left to a config file or the field's default; a
    field with no default is a required flag. The help ends with the field's default."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata:
            continue
        kind = _unwrap_optional(hints[f.name])
        flag = "--" + f.metadata.get("flag", f.name.replace("_", "-"))
        options: dict[str, Any] = {"dest": f.name, "default": None, "help": _help(f, kind)}
        if kind is bool:
            options["action"] = "store_true"
        else:
            options.update(_value_options(f, kind, flag))
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                options["required"] = True
        parser.add_argument(flag, **options)


def given_fields(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of ``cls`` whose flags ``config_flags`` made and the command line gave."""
    given = {}
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name, None)
        if "help" in f.metadata and value is not None:
            given[f.name] = tuple(value) if isinstance(value, list) else value
    return given


def _unwrap_optional(kind: Any) -> Any:
    """``X | None`` as ``X``; any other annotation as it is."""
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        rest = [a for a in typing.get_args(kind) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return kind


def _value_options(f: dataclasses.Field[Any], kind: Any, flag: str) -> dict[str, Any]:
    """argparse's type, choices, nargs and metavar for a field that takes a value."""
    metavar = f.metadata.get("metavar", flag[2:].upper().replace("-", "_"))
    origin = typing.get_origin(kind)
    if origin is Literal:
        choices = typing.get_args(kind)
        return {"type": type(choices[0]), "choices": list(choices)}
    if origin is tuple:
        items = typing.get_args(kind)
        if Ellipsis in items or len(set(items)) != 1:
            raise TypeError(f"{f.name}: a tuple flag needs fixed items of one type, not {kind}")
        return {"type": items[0], "nargs": len(items), "metavar": metavar}
    if kind in (int, float, str):
        return {"type": kind, "metavar": metavar}
    raise TypeError(f"{f.name}: no flag for a field of type {kind}; give it no help to leave it out")


def _help(f: dataclasses.Field[Any], kind: Any) -> str:
    """The field's help, with its default where it has one worth saying (argparse formats help with
    %-style placeholders, so a literal % is doubled)."""
    text = str(f.metadata["help"])
    if kind is not bool and f.default is not dataclasses.MISSING and f.default is not None:
        text += f" (default {_shown(f.default)})"
    return text.replace("%", "%%")


def _shown(value: Any) -> str:
    """A default as it would be typed: ``1 8`` for a pair, ``0.001`` for a float."""
    if isinstance(value, tuple):
        return " ".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)
