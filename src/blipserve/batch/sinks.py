"""Batch outputs, each written atomically (temporary file, then rename) from the journal.

Formats: ``jsonl``, ``csv``, ``parquet`` (id, text, score, error, plus CapFilt columns),
``catalog`` (the catalog's ``predictions.csv``: no header; row, prediction, file name), and
``imagefolder`` (a Hugging Face ``metadata.jsonl``: file_name, text).  Sidecar caption files
are written as rows finish, each atomically too.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from blipserve.batch.journal import OutputError, Record
from blipserve.errors import InvalidInput

FORMATS = ("jsonl", "csv", "parquet", "catalog", "imagefolder")
TABLE_COLUMNS = ("id", "text", "score", "error")
CAPFILT_COLUMNS = ("keep", "text_in", "text_in_score", "text_in_keep")


def infer_format(output: Path, explicit: str | None) -> str:
    """``--format`` if given, else from the output's name."""
    if explicit:
        if explicit not in FORMATS:
            raise InvalidInput(f"unknown --format {explicit!r}; choose from {', '.join(FORMATS)}")
        return explicit
    name = output.name.lower()
    if name == "metadata.jsonl":
        return "imagefolder"
    if name == "predictions.csv":
        return "catalog"
    by_suffix = {".jsonl": "jsonl", ".csv": "csv", ".parquet": "parquet"}
    if output.suffix.lower() in by_suffix:
        return by_suffix[output.suffix.lower()]
    raise InvalidInput(
        f"cannot tell the format of {str(output)!r} from its name; pass --format "
        f"({', '.join(FORMATS)})"
    )


def caption_to_keep(record: Record) -> str | None:
    """The text a caption file or metadata row should get (CapFilt: only what passed)."""
    if record.get("error"):
        return None
    if record.get("keep") is False:
        return record["text_in"] if record.get("text_in_keep") else None
    text = record.get("text")
    return text if isinstance(text, str) else None


def write_output(fmt: str, output: Path, records: Iterable[Record]) -> int:
    """Write the final output atomically; returns the number of rows written."""
    writers: dict[str, Callable[[Path, Iterable[Record]], int]] = {
        "jsonl": _write_jsonl,
        "csv": _write_csv,
        "parquet": _write_parquet,
        "catalog": _write_catalog,
        "imagefolder": _write_imagefolder,
    }
    tmp = output.with_name(f".{output.name}.tmp")
    try:
        count = writers[fmt](tmp, records)
        tmp.replace(output)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {output}: {exc.strerror or exc}") from None
    return count


def _table_rows(records: Iterable[Record]) -> Iterator[dict[str, Any]]:
    for r in records:
        row = {k: r.get(k) for k in TABLE_COLUMNS}
        row["text"] = row["text"] or ""
        row["error"] = row["error"] or ""
        row.update({k: r[k] for k in CAPFILT_COLUMNS if k in r})
        yield row


def _write_jsonl(path: Path, records: Iterable[Record]) -> int:
    n = 0
    with path.open("w", encoding="utf-8") as f:
        for row in _table_rows(records):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
        _sync(f)
    return n


def _write_csv(path: Path, records: Iterable[Record]) -> int:
    n = 0
    with path.open("w", newline="", encoding="utf-8") as f:
        writer: csv.DictWriter[str] | None = None
        for row in _table_rows(records):
            if writer is None:
                writer = csv.DictWriter(f, fieldnames=list(row))
                writer.writeheader()
            writer.writerow({k: "" if v is None else v for k, v in row.items()})
            n += 1
        if writer is None:
            f.write(",".join(TABLE_COLUMNS) + "\n")
        _sync(f)
    return n


def _write_parquet(path: Path, records: Iterable[Record]) -> int:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise InvalidInput(
            "writing Parquet needs pyarrow: pip install 'blipserve[parquet]'"
        ) from None
    rows = list(_table_rows(records))  # one column set; the text-only table is small
    columns = list(rows[0]) if rows else list(TABLE_COLUMNS)
    table = pa.table({c: [r.get(c) for r in rows] for c in columns})
    pq.write_table(table, path)
    return len(rows)


def _write_catalog(path: Path, records: Iterable[Record]) -> int:
    """predictions.csv as the catalog's batch endpoints write it: row, prediction, file."""
    n = 0
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        for r in records:
            writer.writerow([r.get("row") or "", caption_to_keep(r) or "", r.get("source") or ""])
            n += 1
        _sync(f)
    return n


def _write_imagefolder(path: Path, records: Iterable[Record]) -> int:
    root = path.parent.resolve()
    n = 0
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            text = caption_to_keep(r)
            image = r.get("path")
            if text is None or not image:
                continue
            try:
                file_name = Path(image).resolve().relative_to(root).as_posix()
            except ValueError:
                raise InvalidInput(
                    f"imagefolder output: {image} is not inside {root}; write metadata.jsonl "
                    "into the image folder (e.g. --output IMAGES/metadata.jsonl)"
                ) from None
            f.write(json.dumps({"file_name": file_name, "text": text}, ensure_ascii=False) + "\n")
            n += 1
        _sync(f)
    return n


def sidecar_path(image: Path, suffix: str) -> Path:
    return image.with_suffix(suffix if suffix.startswith(".") else f".{suffix}")


def write_sidecar(path: Path, text: str) -> None:
    """Write a caption file atomically (a kill never leaves half a caption)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            f.write(text + "\n")
            _sync(f)
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None


def _sync(f: Any) -> None:
    f.flush()
    os.fsync(f.fileno())
