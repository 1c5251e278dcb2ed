"""Command-line flags generated from config dataclasses, so a new config field is a new flag
with no CLI code to write: `field_name` → `--field-name`, the type from the annotation
(`int | None` included), bools as `--x/--no-x`, the default from the dataclass and the help
from the field's `help` metadata."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, Union

T = TypeVar("T")

_SCALARS = (int, float, str)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """`X | None` → (X, True); anything else → (tp, False)."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _default_of(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _flag_fields(cls: type) -> list[tuple[dataclasses.Field[Any], Any]]:
    """(field, its type without `| None`) for each field that gets a flag."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp, _ = _unwrap_optional(hints[f.name])
        if f.init and not dataclasses.is_dataclass(tp):
            out.append((f, tp))
    return out


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def add_dataclass_args(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    exclude: tuple[str, ...] = (),
    help_overrides: Mapping[str, str] | None = None,
) -> None:
    """Adds one flag per scalar field of `cls`. Fields whose type is itself a dataclass (nested
    configs) are skipped: add their class separately."""
    for f, tp in _flag_fields(cls):
        if f.name in exclude:
            continue
        help_text = (help_overrides or {}).get(f.name) or f.metadata.get("help", "")
        default = _default_of(f)
        flag = flag_name(f.name)
        # A None default means "derived" and the help text says from what.
        help_text += "" if default is None else " (default: %(default)s)"
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif typing.get_origin(tp) is Literal:
            choices = typing.get_args(tp)
            parser.add_argument(flag, type=type(choices[0]), choices=choices, default=default, help=help_text)
        elif tp in _SCALARS:
            metavar = {int: "N", float: "X", str: "STR"}[tp]
            parser.add_argument(flag, type=tp, default=default, metavar=metavar, help=help_text)
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: no flag for type {tp!r}")


def dataclass_from_args(cls: type[T], args: argparse.Namespace, **overrides: Any) -> T:
    """Builds `cls` from the flags `add_dataclass_args` added (its __post_init__ validates);
    nested configs and anything else not on the command line come from `overrides`."""
    values = {f.name: getattr(args, f.name) for f, _ in _flag_fields(cls) if hasattr(args, f.name)}
    values.update(overrides)
    return cls(**values)


def dataclass_to_argv(obj: Any, *, exclude: tuple[str, ...] = ()) -> list[str]:
    """The flags that rebuild `obj` in another process: one per field that differs from its default."""
    argv: list[str] = []
    for f, tp in _flag_fields(type(obj)):
        value = getattr(obj, f.name)
        if f.name in exclude or value == _default_of(f):
            continue
        if tp is bool:
            argv.append(flag_name(f.name) if value else "--no-" + f.name.replace("_", "-"))
        elif value is not None:
            argv += [flag_name(f.name), str(value)]
    return argv
