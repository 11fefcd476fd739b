"""Tables and lists of images: CSV, JSONL and Parquet files with an ``image`` column
(and optionally ``text``), and text files naming one image a line.

A row's ``id`` is ``file:row``; its image is a file (relative to the table's folder, or an
object-store URL), an http(s) URL or the image itself in base64 (:func:`image_file`
tells which).  A row that cannot be read becomes an :class:`InputRow` with an ``error``,
recorded rather than run; a file that is not a table at all raises.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import sys
from collections.abc import Iterator, Mapping
from typing import Any

from blipserve.batch.rows import InputRow
from blipserve.batch.storage import Location, is_store_url
from blipserve.errors import InvalidInput, quote
from blipserve.images import could_be_path

log = logging.getLogger(__name__)

TABLE_EXTENSIONS = frozenset({".csv", ".jsonl", ".parquet"})
LIST_EXTENSIONS = frozenset({".txt", ".lst"})
# Only base64's letters (standard or urlsafe), padding and line breaks: no '.', no spaces.
_BASE64_TEXT = re.compile(r"[A-Za-z0-9+/\-_=\s]+")


class NotATable(InvalidInput):
    """A table without an 'image' column: an error for a named input, skipped in a folder
    (a metadata.jsonl or predictions.csv written there is not an input)."""


def iter_table(where: Location, name: str) -> Iterator[InputRow]:
    """The rows of a table or list (by its suffix, one of :data:`TABLE_EXTENSIONS` or
    :data:`LIST_EXTENSIONS`); ``name`` is the rows' source."""
    readers = {".csv": _iter_csv, ".jsonl": _iter_jsonl, ".parquet": _iter_parquet}
    suffix = where.suffix.lower()
    reader = _iter_list if suffix in LIST_EXTENSIONS else readers[suffix]
    yield from reader(where, name)


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
