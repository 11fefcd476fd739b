"""Batch inputs, read lazily: image folders, WebDataset shards, and the tables and text
lists that :mod:`blipserve.batch.tables` reads, alone or inside a folder.

Inputs are :class:`~blipserve.batch.storage.Location`\\ s: local paths or object-store URLs.
Every input row gets a stable ``id`` (a path relative to the input for images in a folder,
``file:row`` for tables and lists) that does not depend on the current directory, so that a
resumed job recognises what it has already done.  Nothing here materialises the whole
input: rows are generated as they are read (an object store's folder is listed one folder
at a time), and nothing here reads an image: the job does, concurrently.
"""

from __future__ import annotations

import logging
import os
import posixpath
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from blipserve.batch.rows import InputRow
from blipserve.batch.shards import SHARD_EXTENSIONS, expand, is_pattern, sample_text, samples
from blipserve.batch.sinks import sidecar_name
from blipserve.batch.storage import Location, locate
from blipserve.batch.tables import LIST_EXTENSIONS, TABLE_EXTENSIONS, NotATable, iter_table
from blipserve.errors import InvalidInput, quote

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


def as_location(where: Location | str | os.PathLike[str]) -> Location:
    return where if isinstance(where, Location) else locate(where)


@dataclass(frozen=True)
class ReadOptions:
    """How to read an input.  ``exclude``: locations (as text) that are never inputs (this
    job's own outputs); ``sidecar``: the caption files' suffix, so that images with one
    are marked and the caption files themselves are never read as inputs; ``text_from``:
    a shard sample's text (``txt`` or ``json:FIELD``); ``skip_shard``: shards (by name)
    not to read at all (their output is written already); ``allowed``: the files a job may
    read (a table or shard in a folder that links elsewhere is a failed row)."""

    exclude: frozenset[str] = frozenset()
    sidecar: str | None = None
    text_from: str | None = None
    skip_shard: Callable[[str], bool] | None = None
    allowed: Callable[[str], bool] | None = None


def iter_rows(
    where: Location | str | os.PathLike[str], how: ReadOptions | None = None
) -> Iterator[InputRow]:
    """Rows of a folder of images, tables or WebDataset shards, a table, a text list of
    images, a shard, or a brace pattern of shards."""
    root = as_location(where)
    how = how or ReadOptions()
    if is_pattern(root.path):
        for name, shard in shard_locations(root):
            yield from iter_shard(shard, name, how)
    elif root.is_dir():
        yield from _iter_folder(root, how)
    elif root.is_file():
        yield from _iter_file(root, root.name, how)
    else:
        raise InvalidInput(f"input {quote(str(root), 200)} does not exist")


def check_input(where: Location | str | os.PathLike[str]) -> None:
    """Fail at once on an input that is not there (a pattern: its first shard), before a
    model loads for minutes; an unreachable store is a StorageError naming it."""
    root = as_location(where)
    first = shard_locations(root)[0][1] if is_pattern(root.path) else root
    if not first.exists():
        raise InvalidInput(f"input {quote(str(first), 200)} does not exist")


def is_shards(where: Location) -> bool:
    """Whether the input is WebDataset shards (a pattern, a .tar, or a folder of them)."""
    if is_pattern(where.path) or where.suffix.lower() in SHARD_EXTENSIONS:
        return True
    if not where.is_dir():
        return False
    for path, _ in _walk(where):
        suffix = path.suffix.lower()
        if suffix in IMAGE_EXTENSIONS or suffix in TABLE_EXTENSIONS:
            return False
        if suffix in SHARD_EXTENSIONS:
            return True
    return False


def shard_locations(root: Location) -> list[tuple[str, Location]]:
    """(name, location) of each shard a brace pattern names; the name is relative to the
    pattern's fixed folder (``shards/{0..2}.tar`` -> ``0.tar``, ...)."""
    base = posixpath.dirname(root.path[: root.path.index("{")])
    out = []
    for path in expand(root.path):
        where = root.at(path)
        out.append((where.relative_to(root.child(base)) or where.name, where))
    return out


def shard_list(
    root: Location,
    exclude: frozenset[str] = frozenset(),
    allowed: Callable[[str], bool] | None = None,
) -> list[tuple[str, Location]]:
    """(name, location) of each shard of an input made only of shards (a pattern, a .tar,
    or a folder of them), in the order :func:`iter_rows` reads them; empty when the input
    holds anything else (images or tables), which only :func:`iter_rows` reads."""
    if is_pattern(root.path):
        return shard_locations(root)
    if root.suffix.lower() in SHARD_EXTENSIONS:
        return [(root.name, root)]
    out = []
    for where, _ in _walk(root):
        suffix = where.suffix.lower()
        if suffix in IMAGE_EXTENSIONS or suffix in TABLE_EXTENSIONS:
            return []
        if suffix in SHARD_EXTENSIONS and str(where) not in exclude:
            if allowed and not allowed(str(where)):
                log.warning("skipping %s: it leads outside the folders this job may read", where)
                continue
            out.append((where.relative_to(root) or where.name, where))
    return out


def iter_shard(shard: Location, name: str, how: ReadOptions) -> Iterator[InputRow]:
    """The rows of one shard (``name``: its row source), one sample in memory at a time."""
    if how.skip_shard and how.skip_shard(name):
        log.info("%s: its output shard is written already; skipped", name)
        return
    for sample in samples(shard):
        data = sample.image()
        text, error = sample_text(sample, how.text_from)
        if data is None:
            members = ", ".join(quote(info.name, 40) for info, _ in sample.members[:5])
            error = f"sample has no image ({members})"
        yield InputRow(
            id=sample.key,
            image=f"{shard}:{sample.key}",
            text=text,
            source=name,
            error=error,
            data=data,
        )


def count_rows(where: Location | str | os.PathLike[str]) -> int | None:
    """How many rows :func:`iter_rows` will yield, when that is cheap to know (else None:
    tables, and folders in object stores, which would have to be listed twice)."""
    root = as_location(where)
    if not root.local or is_pattern(root.path):
        return None
    if root.is_dir():
        images = tables = 0
        for path, _ in _walk(root):
            suffix = path.suffix.lower()
            images += suffix in IMAGE_EXTENSIONS
            tables += suffix in TABLE_EXTENSIONS or suffix in SHARD_EXTENSIONS
        return images if not tables else None
    if root.suffix.lower() in LIST_EXTENSIONS:
        with root.open("rb") as f:
            return sum(1 for line in f if line.strip() and not line.lstrip().startswith(b"#"))
    return None


def _walk(root: Location) -> Iterator[tuple[Location, frozenset[str]]]:
    """Files under ``root`` in a stable (sorted) order, with the names of the files beside
    each, one folder listed at a time; hidden entries and linked folders are skipped."""
    try:
        entries = root.listing()
    except OSError as exc:
        raise InvalidInput(f"cannot list folder '{root}': {exc.strerror or exc}") from None
    kinds = [(root.entry(e), _kind(root, e)) for e in entries]
    names = frozenset(where.name for where, kind in kinds if kind == "file")
    for where, kind in kinds:
        if where.name.startswith(".") or where.path == root.path:
            continue
        if kind == "directory":
            yield from _walk(where)
        elif kind == "file":
            yield where, names


def _kind(root: Location, info: Mapping[str, Any]) -> str:
    """An entry's type; a local link counts as the file it points to (a linked folder is
    not followed: links can loop)."""
    if root.local and info.get("islink"):
        return "file" if os.path.isfile(str(info["name"])) else "link"
    return str(info.get("type"))


def _iter_folder(root: Location, how: ReadOptions) -> Iterator[InputRow]:
    """Images in the folder (recursively); tables and shards in it are read as such."""
    sidecar = how.sidecar
    for where, siblings in _walk(root):
        if str(where) in how.exclude:
            continue
        suffix = where.suffix.lower()
        rel = where.relative_to(root) or where.name
        if suffix in IMAGE_EXTENSIONS:
            has = bool(sidecar) and sidecar_name(where.name, sidecar or "") in siblings
            yield InputRow(id=rel, image=str(where), path=str(where), source=rel, has_sidecar=has)
        elif how.allowed and not how.allowed(str(where)):  # (images: judged when read)
            if suffix in TABLE_EXTENSIONS or suffix in SHARD_EXTENSIONS:
                error = f"'{where}' leads outside the folders this job may read"
                yield InputRow(id=rel, image=str(where), source=rel, error=error)
        elif suffix in TABLE_EXTENSIONS:
            if (
                sidecar
                and sidecar_name(where.name, sidecar) == where.name
                and any(
                    sibling != where.name and sidecar_name(sibling, sidecar) == where.name
                    for sibling in siblings
                )
            ):
                continue  # a caption file this job (or one like it) wrote
            try:
                yield from iter_table(where, rel)
            except NotATable as exc:
                log.warning("skipping %s: %s", where, exc.message)
        elif suffix in SHARD_EXTENSIONS:
            yield from iter_shard(where, rel, how)


def _iter_file(where: Location, name: str, how: ReadOptions) -> Iterator[InputRow]:
    suffix = where.suffix.lower()
    if suffix in SHARD_EXTENSIONS:
        yield from iter_shard(where, name, how)
    elif suffix in TABLE_EXTENSIONS or suffix in LIST_EXTENSIONS:
        yield from iter_table(where, name)
    elif suffix in IMAGE_EXTENSIONS:
        yield InputRow(id=name, image=str(where), path=str(where), source=name)
    else:
        raise InvalidInput(
            f"input {quote(str(where), 200)}: unknown kind of file; expected a folder, an "
            f"image, a table ({', '.join(sorted(TABLE_EXTENSIONS))}), a list "
            f"({', '.join(sorted(LIST_EXTENSIONS))}) or WebDataset shards (.tar)"
        )
