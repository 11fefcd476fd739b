"""How a configuration field is declared once and read from flags and the environment.

A field is a dataclass field made by :func:`option`: its default, its help text and, in
its metadata, anything the command line or the environment needs to know (a flag name
other than ``--field-name``, a short flag, a parser for a type of our own, whether an
environment variable may set it).  The CLI derives its flags from the fields
(:mod:`blipserve.cli`); :func:`from_env` reads ``BLIPSERVE_<FIELD>`` variables.  Values
from either source are strings turned into the field's type by :func:`convert`, so a flag
and its variable accept the same text and refuse it with the same message.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import field
from typing import Any, Literal, TypeVar, Union

from blipserve.errors import BlipserveError, InvalidInput

C = TypeVar("C")

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


def option(
    default: Any,
    help: str,
    *,
    flag: str | None = None,
    short: str | None = None,
    env: bool = True,
    metavar: str | None = None,
    parse: Callable[[Any], Any] | None = None,
    repeatable: bool = False,
    secret: bool = False,
    commands: tuple[str, ...] | None = None,
) -> Any:
    """A configuration field.

    ``flag`` replaces the derived ``--field-name``; ``short`` adds e.g. ``-o``; ``env=False``
    keeps a job's own values (its output, ``--overwrite``) out of the environment;
    ``parse`` turns the text (a list of texts when ``repeatable``) into a type of our own;
    a ``secret`` (keys, credentials) is left out of the config's ``repr``; ``commands``
    names the only commands that take the flag, in a part several commands share.
    """
    metadata = {
        "help": help,
        "flag": flag,
        "short": short,
        "env": env,
        "metavar": metavar,
        "parse": parse,
        "repeatable": repeatable,
        "commands": commands,
    }
    if isinstance(default, dict):  # a mutable default: each config gets its own
        return field(default_factory=lambda: dict(default), metadata=metadata, repr=not secret)
    return field(default=default, metadata=metadata, repr=not secret)


def values_of(config: Any) -> dict[str, Any]:
    """A config dataclass's fields by name, as they are (``dataclasses.asdict`` would turn a
    field that is a dataclass itself, ``--max-failures``' FailureLimit, into a dict)."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


def takes_flag(f: dataclasses.Field[Any], command: str) -> bool:
    """Whether ``command`` has a flag for ``f`` (a field may be one command's only)."""
    only = f.metadata.get("commands")
    return only is None or command in only


def flag_name(f: dataclasses.Field[Any]) -> str:
    return str(f.metadata.get("flag") or "--" + f.name.replace("_", "-"))


def env_name(f: dataclasses.Field[Any]) -> str | None:
    """``BLIPSERVE_<FIELD>``, or None for a field the environment may not set."""
    return f"BLIPSERVE_{f.name.upper()}" if f.metadata.get("env", True) else None


def fields_with_types(cls: type[Any]) -> list[tuple[dataclasses.Field[Any], Any]]:
    """The fields of a config dataclass with their resolved type hints."""
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)]


def base_type(hint: Any) -> Any:
    """``int | None`` -> ``int``; ``str | os.PathLike[str] | None`` -> ``str``."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        return next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return hint


def is_flag(hint: Any) -> bool:
    """Whether a field is an on/off switch (``--x`` / ``--no-x``)."""
    return base_type(hint) is bool


def is_repeated(f: dataclasses.Field[Any], hint: Any) -> bool:
    """Whether the flag may be given several times (its values collected in a list)."""
    return bool(f.metadata.get("repeatable")) or typing.get_origin(base_type(hint)) is tuple


def choices(hint: Any) -> tuple[str, ...] | None:
    kind = base_type(hint)
    return typing.get_args(kind) if typing.get_origin(kind) is Literal else None


def convert(f: dataclasses.Field[Any], hint: Any, raw: str | list[str]) -> Any:
    """Text from a flag or a variable as the field's type; ValueError says what was wrong."""
    parse = f.metadata.get("parse")
    if parse is not None:
        try:
            return parse(raw)
        except BlipserveError as exc:
            raise ValueError(exc.message) from None
    if isinstance(raw, list):  # a repeated flag
        return tuple(raw)
    kind = base_type(hint)
    if typing.get_origin(kind) is tuple:
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    allowed = choices(hint)
    if allowed is not None:
        if raw not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}; got {raw!r}")
        return raw
    if kind is bool:
        if raw.strip().lower() in _TRUE:
            return True
        if raw.strip().lower() in _FALSE:
            return False
        raise ValueError(f"expected true or false, got {raw!r}")
    if kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise ValueError(f"expected {what}, got {raw!r}") from None
    return raw


def from_env(cls: type[C], env: Mapping[str, str] | None = None, **overrides: Any) -> C:
    """A config dataclass from its ``BLIPSERVE_<FIELD>`` variables, then ``overrides``
    (the command line's values; ``None`` means not given).

    Raises :class:`InvalidInput` naming the variable or the option that was wrong.
    """
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for f, hint in fields_with_types(cls):
        key = env_name(f)
        if key is not None and key in env:
            try:
                values[f.name] = convert(f, hint, env[key])
            except ValueError as exc:
                raise InvalidInput(f"environment variable {key}: {exc}") from None
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return cls(**values)
    except ValueError as exc:  # a part's own checks (e.g. a negative batch size)
        raise InvalidInput(f"invalid option: {exc}") from None
