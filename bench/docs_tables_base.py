"""bench/docs_tables.py's parts every table uses: the registry of renderers by block name,
reading a results file, and the shapes of a table and of its cells."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

Renderer = Callable[[Path], str]
RENDERERS: dict[str, Renderer] = {}


def renderer(name: str) -> Callable[[Renderer], Renderer]:
    def register(fn: Renderer) -> Renderer:
        RENDERERS[name] = fn
        return fn

    return register


def load(results: Path, name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((results / name).read_text())
    return data


def span(values: Iterable[float] | None, fmt: str = ".2f") -> str:
    """`` (lo-hi)`` over repeated passes, or nothing for one pass."""
    values = list(values or [])
    if len(values) < 2:
        return ""
    return f" ({min(values):{fmt}}-{max(values):{fmt}})"


def cpu_machine(report: dict[str, Any]) -> str:
    m = report["machine"]
    return f"{m['cpu']}, {m['usable_cores']} cores, torch {m['torch'].split('+')[0]}"


def speed_model(report: dict[str, Any], layout: str) -> dict[str, Any]:
    return next(m for m in report["models"] if m["layout"] == layout)


def server_levels(report: dict[str, Any], name: str) -> dict[int, dict[str, Any]]:
    server = next(s for s in report["servers"] if s["name"] == name)
    return {level["clients"]: level for level in server["levels"]}


def table(
    intro: str, columns: Sequence[str], rows: Iterable[str], after: str = "", left: int = 1
) -> str:
    """A results block: ``intro``, a blank line, the header row of ``columns``, its separator
    (the first ``left`` columns aligned left, the others right: they hold numbers), the
    ``rows`` (each already a ``| ... |`` line), and ``after`` as a paragraph of its own.

    Rows stay lines rather than cells: the docs' rows space an empty cell two ways (``| |``
    leading, ``|  |`` trailing), and a block must stay byte for byte what it was."""
    header = "|" + "".join(f" {c} |" if c else " |" for c in columns)
    separator = "|" + "".join("---|" if i < left else "---:|" for i in range(len(columns)))
    return "\n".join([intro, "", header, separator, *rows, *(["", after] if after else [])])
