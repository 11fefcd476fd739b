"""Batch inputs, read lazily: image folders, CSV/JSONL/Parquet tables, text lists.

Every input row gets a stable ``id`` (a relative path for images in a folder, ``file:row``
for tables and lists) so that a resumed job recognises what it has already done.  Nothing
here materialises the whole input: rows are generated as they are read.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from blipserve.errors import InvalidInput

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
TABLE_EXTENSIONS = frozenset({".csv", ".jsonl", ".parquet"})
LIST_EXTENSIONS = frozenset({".txt", ".lst"})


@dataclass(frozen=True)
class InputRow:
    """One unit of work.

    ``image`` is a path, http(s) URL or base64 text; ``path`` is set when the image is a
    local file (sidecars go next to it); ``source`` and ``row`` locate table rows (the
    catalog's predictions.csv reports them); ``error`` is set when the row itself is
    unreadable (e.g. no image value), so it is recorded rather than run.
    """

    id: str
    image: str
    text: str | None = None
    path: Path | None = None
    source: str | None = None
    row: str | None = None
    error: str | None = None


def iter_rows(input_path: Path) -> Iterator[InputRow]:
    """Rows of a folder of images or tables, a table, or a text list of images."""
    if input_path.is_dir():
        yield from _iter_folder(input_path)
    elif input_path.is_file():
        yield from _iter_file(input_path, input_path.name)
    else:
        raise InvalidInput(f"input {str(input_path)!r} does not exist")


def count_rows(input_path: Path) -> int | None:
    """How many rows :func:`iter_rows` will yield, when that is cheap to know (else None)."""
    if input_path.is_dir():
        images = tables = 0
        for path in _walk(input_path):
            suffix = path.suffix.lower()
            images += suffix in IMAGE_EXTENSIONS
            tables += suffix in TABLE_EXTENSIONS
        return images if not tables else None
    if input_path.suffix.lower() in LIST_EXTENSIONS:
        with input_path.open("rb") as f:
            return sum(1 for line in f if line.strip() and not line.lstrip().startswith(b"#"))
    return None


def _walk(root: Path) -> Iterator[Path]:
    """Files under ``root`` in a stable (sorted) order, lazily, skipping hidden entries."""
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as exc:
        raise InvalidInput(f"cannot list folder {str(root)!r}: {exc.strerror}") from None
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.is_dir(follow_symlinks=False):
            yield from _walk(Path(entry.path))
        elif entry.is_file():
            yield Path(entry.path)


def _iter_folder(root: Path) -> Iterator[InputRow]:
    """Images in the folder (recursively); tables in it are read as tables."""
    for path in _walk(root):
        suffix = path.suffix.lower()
        rel = path.relative_to(root).as_posix()
        if suffix in IMAGE_EXTENSIONS:
            yield InputRow(id=rel, image=str(path), path=path, source=rel)
        elif suffix in TABLE_EXTENSIONS:
            yield from _iter_file(path, rel)


def _iter_file(path: Path, name: str) -> Iterator[InputRow]:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        yield from _iter_csv(path, name)
    elif suffix == ".jsonl":
        yield from _iter_jsonl(path, name)
    elif suffix == ".parquet":
        yield from _iter_parquet(path, name)
    elif suffix in LIST_EXTENSIONS:
        yield from _iter_list(path, name)
    elif suffix in IMAGE_EXTENSIONS:
        yield InputRow(id=name, image=str(path), path=path, source=name)
    else:
        raise InvalidInput(
            f"input {str(path)!r}: unknown kind of file; expected a folder, an image, a table "
            f"({', '.join(sorted(TABLE_EXTENSIONS))}) or a list ({', '.join(LIST_EXTENSIONS)})"
        )


def _table_row(
    base: Path, name: str, number: int, record: Mapping[str, object], label: object | None = None
) -> InputRow:
    row_id = f"{name}:{number}"
    row = str(label) if label is not None else str(number)
    image = record.get("image")
    text = record.get("text")
    if not isinstance(image, str) or not image.strip():
        what = "missing" if image is None or image == "" else f"not text ({type(image).__name__})"
        return InputRow(id=row_id, image="", source=name, row=row, error=f"'image' is {what}")
    text_value = text.strip() or None if isinstance(text, str) else None
    image = image.strip()
    path = _local_path(base, image)
    return InputRow(
        id=row_id,
        image=str(path) if path else image,
        text=text_value,
        path=path,
        source=name,
        row=row,
    )


def _local_path(base: Path, value: str) -> Path | None:
    """A table's image value as a local file (relative to the table's folder), if it is one."""
    if value.startswith(("http://", "https://", "data:")) or len(value) > 4096:
        return None
    candidate = Path(value).expanduser()
    if not candidate.is_absolute():
        candidate = base / candidate
    return candidate if candidate.is_file() else None


def _iter_csv(path: Path, name: str) -> Iterator[InputRow]:
    # Base64 images make fields far larger than csv's 128 KiB default.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                return
            if "image" not in header:
                raise InvalidInput(f"{name}: no 'image' column (columns: {header})")
            # pandas' to_csv writes the index as a leading unnamed column: the catalog's
            # batch files have one, and predictions.csv reports its value as the row.
            index_col = 0 if header[0] in ("", "Unnamed: 0") else None
            for number, values in enumerate(reader):
                if not values:
                    continue
                record = dict(zip(header, values, strict=False))
                if len(values) != len(header):
                    yield InputRow(
                        id=f"{name}:{number}",
                        image="",
                        source=name,
                        row=str(number),
                        error=f"has {len(values)} fields but the header has {len(header)}",
                    )
                    continue
                label = values[index_col] if index_col is not None else None
                yield _table_row(path.parent, name, number, record, label)
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"{name}: not UTF-8 text ({exc.reason})") from None
    except csv.Error as exc:
        raise InvalidInput(f"{name}: unreadable CSV: {exc}") from None


def _iter_jsonl(path: Path, name: str) -> Iterator[InputRow]:
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                yield InputRow(
                    id=f"{name}:{number}",
                    image="",
                    source=name,
                    row=str(number),
                    error=f"not valid JSON: {exc}",
                )
                continue
            if not isinstance(record, dict):
                yield InputRow(
                    id=f"{name}:{number}",
                    image="",
                    source=name,
                    row=str(number),
                    error="not a JSON object",
                )
                continue
            yield _table_row(path.parent, name, number, record)


def _iter_parquet(path: Path, name: str) -> Iterator[InputRow]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InvalidInput(
            "reading Parquet needs pyarrow: pip install 'blipserve[parquet]'"
        ) from None
    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid and friends
        raise InvalidInput(f"{name}: unreadable Parquet: {exc}") from None
    columns = [c for c in ("image", "text") if c in parquet.schema_arrow.names]
    if "image" not in columns:
        raise InvalidInput(f"{name}: no 'image' column (columns: {parquet.schema_arrow.names})")
    number = 0
    for batch in parquet.iter_batches(batch_size=256, columns=columns):
        for record in batch.to_pylist():
            image = record.get("image")
            if isinstance(image, bytes):  # image bytes stored directly
                import base64

                record["image"] = base64.b64encode(image).decode()
            yield _table_row(path.parent, name, number, record)
            number += 1


def _iter_list(path: Path, name: str) -> Iterator[InputRow]:
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f):
            value = line.strip()
            if not value or value.startswith("#"):
                continue
            yield _table_row(path.parent, name, number, {"image": value})
