"""Architecture name (``config.json``'s ``architectures``) -> adapter class."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from blipserve.models.base import HFAdapter

ADAPTERS: dict[str, type[HFAdapter]] = {}

A = TypeVar("A", bound=type[HFAdapter])


def register(*architectures: str) -> Callable[[A], A]:
    """Class decorator: serve these transformers architectures with the adapter."""

    def wrap(cls: A) -> A:
        for name in architectures:
            ADAPTERS[name] = cls
        return cls

    return wrap
