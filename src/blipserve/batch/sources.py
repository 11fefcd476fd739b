"""Batch inputs, read lazily: image folders, CSV/JSONL/Parquet tables, text lists.

Inputs are :class:`~blipserve.batch.storage.Location`\\ s: local paths or object-store URLs.
Every input row gets a stable ``id`` (a path relative to the input for images in a folder,
``file:row`` for tables and lists) that does not depend on the current directory, so that a
resumed job recognises what it has already done.  Nothing here materialises the whole
input: rows are generated as they are read (an object store's folder is listed one folder
at a time), and nothing here reads an image: the job does, concurrently.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import posixpath
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from blipserve.batch.shards import SHARD_EXTENSIONS, expand, is_pattern, sample_text, samples
from blipserve.batch.sinks import sidecar_name
from blipserve.batch.storage import Location, is_store_url, locate
from blipserve.errors import InvalidInput, quote
from blipserve.images import could_be_path

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
TABLE_EXTENSIONS = frozenset({".csv", ".jsonl", ".parquet"})
LIST_EXTENSIONS = frozenset({".txt", ".lst"})
# Only base64's letters (standard or urlsafe), padding and line breaks: no '.', no spaces.
_BASE64_TEXT = re.compile(r"[A-Za-z0-9+/\-_=\s]+")


@dataclass(frozen=True)
class InputRow:
    """One unit of work.

    ``image`` is what the engine decodes (an http(s) URL or base64 text) or, for a file, its
    location; ``path`` is set when the image is a file (local path or store URL) for the job
    to read, and sidecars go next to it; ``source`` and ``row`` locate table rows (the
    catalog's predictions.csv reports them); ``error`` is set when the row itself is
    unreadable (e.g. no image value), so it is recorded rather than run.  ``has_sidecar``:
    the folder listing showed a caption file next to the image already (driver side only);
    ``data``: the image's bytes, when they came with the row (a WebDataset sample).
    """

    id: str
    image: str
    text: str | None = None
    path: str | None = None
    source: str | None = None
    row: str | None = None
    error: str | None = None
    has_sidecar: bool = False
    data: bytes | None = None  # the image itself (a shard's sample)


class NotATable(InvalidInput):
    """A table without an 'image' column: an error for a named input, skipped in a folder
    (a metadata.jsonl or predictions.csv written there is not an input)."""


def as_location(where: Location | str | os.PathLike[str]) -> Location:
    return where if isinstance(where, Location) else locate(where)


@dataclass(frozen=True)
class ReadOptions:
    """How to read an input.  ``exclude``: locations (as text) that are never inputs (this
    job's own outputs); ``sidecar``: the caption files' suffix, so that images with one
    are marked and the caption files themselves are never read as inputs; ``text_from``:
    a shard sample's text (``txt`` or ``json:FIELD``); ``skip_shard``: shards (by name)
    not to read at all (their output is written already)."""

    exclude: frozenset[str] = frozenset()
    sidecar: str | None = None
    text_from: str | None = None
    skip_shard: Callable[[str], bool] | None = None


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


def shard_list(root: Location, exclude: frozenset[str] = frozenset()) -> list[tuple[str, Location]]:
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
                yield from _iter_file(where, rel, how)
            except NotATable as exc:
                log.warning("skipping %s: %s", where, exc.message)
        elif suffix in SHARD_EXTENSIONS:
            yield from iter_shard(where, rel, how)


def _iter_file(where: Location, name: str, how: ReadOptions) -> Iterator[InputRow]:
    suffix = where.suffix.lower()
    if suffix in SHARD_EXTENSIONS:
        yield from iter_shard(where, name, how)
    elif suffix == ".csv":
        yield from _iter_csv(where, name)
    elif suffix == ".jsonl":
        yield from _iter_jsonl(where, name)
    elif suffix == ".parquet":
        yield from _iter_parquet(where, name)
    elif suffix in LIST_EXTENSIONS:
        yield from _iter_list(where, name)
    elif suffix in IMAGE_EXTENSIONS:
        yield InputRow(id=name, image=str(where), path=str(where), source=name)
    else:
        raise InvalidInput(
            f"input {quote(str(where), 200)}: unknown kind of file; expected a folder, an "
            f"image, a table ({', '.join(sorted(TABLE_EXTENSIONS))}), a list "
            f"({', '.join(sorted(LIST_EXTENSIONS))}) or WebDataset shards (.tar)"
        )


def _table_row(
    base: Location,
    name: str,
    number: int,
    record: Mapping[str, object],
    label: object | None = None,
) -> InputRow:
    row_id = f"{name}:{number}"
    row = str(label) if label is not None else str(number)
    try:
        image = record.get("image")
        text = record.get("text")
        if not isinstance(image, str) or not image.strip():
            what = (
                "missing" if image is None or image == "" else f"not text ({type(image).__name__})"
            )
            return InputRow(id=row_id, image="", source=name, row=row, error=f"'image' is {what}")
        text_value = text.strip() or None if isinstance(text, str) else None
        image = image.strip()
        path = image_file(base, image)
        return InputRow(
            id=row_id, image=path or image, text=text_value, path=path, source=name, row=row
        )
    except Exception as exc:  # a check on one cell never escapes its row
        log.exception("reading %s failed", row_id)
        return InputRow(
            id=row_id, image="", source=name, row=row, error=f"unreadable row: {type(exc).__name__}"
        )


def image_file(base: Location, value: str) -> str | None:
    """A table cell's image as a file to read (its location, relative to the table's
    folder), or None when the cell is the image itself (base64) or an http(s) URL.

    Decided from the text alone where it can be: base64 of a real image cannot be a path
    (too long, wrapped over lines, or a path component too long), and names of files
    nearly always hold a '.', which base64 never does.  Only short text of base64's letters
    alone is looked up, and only on a local disk.
    """
    if value[:8].lower().startswith(("http://", "https://", "data:")):
        return None
    if is_store_url(value):
        return value
    if not could_be_path(value):
        return None
    if _BASE64_TEXT.fullmatch(value):
        if not base.local:
            return None
        candidate = base.child(os.path.expanduser(value))
        try:
            return str(candidate) if os.path.isfile(candidate.path) else None
        except (OSError, ValueError):
            return None
    return str(base.child(os.path.expanduser(value)) if base.local else base.child(value))


def _iter_csv(where: Location, name: str) -> Iterator[InputRow]:
    # Base64 images make fields far larger than csv's 128 KiB default.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    try:
        with where.open("rb") as raw, _text(raw, "utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                return
            if "image" not in header:
                raise NotATable(f"{name}: no 'image' column (columns: {_columns(header)})")
            # pandas' to_csv writes the index as a leading unnamed column: the catalog's
            # batch files have one, and predictions.csv reports its value as the row.
            index_col = 0 if header[0] in ("", "Unnamed: 0") else None
            for number, values in enumerate(reader):
                if not values:
                    continue
                if len(values) != len(header):
                    yield _bad(
                        name, number, f"has {len(values)} fields but the header has {len(header)}"
                    )
                    continue
                record = dict(zip(header, values, strict=True))
                label = values[index_col] if index_col is not None else None
                yield _table_row(where.parent, name, number, record, label)
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"{name}: not UTF-8 text ({exc.reason})") from None
    except csv.Error as exc:
        raise InvalidInput(f"{name}: unreadable CSV: {exc}") from None


def _iter_jsonl(where: Location, name: str) -> Iterator[InputRow]:
    first = True
    with where.open("rb") as raw, _text(raw, "utf-8") as f:
        for number, line in enumerate(f):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                yield _bad(name, number, f"not valid JSON: {exc}")
                continue
            if not isinstance(record, dict):
                yield _bad(name, number, "not a JSON object")
                continue
            if first and "image" not in record:
                # the first object names the fields, as a header would
                raise NotATable(f"{name}: no 'image' field (fields: {_columns(list(record))})")
            first = False
            yield _table_row(where.parent, name, number, record)


def _iter_parquet(where: Location, name: str) -> Iterator[InputRow]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InvalidInput(
            "reading Parquet needs pyarrow: pip install 'blipserve[parquet]'"
        ) from None
    with where.open("rb") as f:
        try:
            parquet = pq.ParquetFile(f)
        except Exception as exc:  # pyarrow raises ArrowInvalid and friends
            raise InvalidInput(f"{name}: unreadable Parquet: {quote(str(exc), 200)}") from None
        names = parquet.schema_arrow.names
        columns = [c for c in ("image", "text") if c in names]
        if "image" not in columns:
            raise NotATable(f"{name}: no 'image' column (columns: {_columns(names)})")
        number = 0
        for batch in parquet.iter_batches(batch_size=256, columns=columns):
            for record in batch.to_pylist():
                image = record.get("image")
                if isinstance(image, bytes):  # image bytes stored directly
                    import base64

                    record["image"] = base64.b64encode(image).decode()
                yield _table_row(where.parent, name, number, record)
                number += 1


def _iter_list(where: Location, name: str) -> Iterator[InputRow]:
    with where.open("rb") as raw, _text(raw, "utf-8") as f:
        for number, line in enumerate(f):
            value = line.strip()
            if not value or value.startswith("#"):
                continue
            yield _table_row(where.parent, name, number, {"image": value})


def _text(raw: Any, encoding: str) -> io.TextIOWrapper:
    return io.TextIOWrapper(raw, encoding=encoding, newline="")


def _bad(name: str, number: int, error: str) -> InputRow:
    return InputRow(id=f"{name}:{number}", image="", source=name, row=str(number), error=error)


def _columns(names: list[str]) -> str:
    """A header for a message: each name quoted short (a header may be a row of base64)."""
    shown = ", ".join(quote(n, 30) for n in names[:10])
    return f"[{shown}{', ...' if len(names) > 10 else ''}]"
