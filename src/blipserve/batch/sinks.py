"""Batch outputs, each written atomically from the journal (locally a temporary file, then
a rename; in an object store one put of the whole object).

Formats: ``jsonl``, ``csv``, ``parquet`` (id, text, score, error, plus ``texts`` when each
row asked for several, and the CapFilt columns), ``catalog`` (the catalog's
``predictions.csv``: no header; row, prediction, file name), and ``imagefolder`` (a Hugging
Face ``metadata.jsonl``: file_name, text); these two, and shards, take the best text only.
Sidecar caption files are written as rows finish (:class:`Sidecars`), each atomically
too.  Each output is written from :class:`~blipserve.batch.rows.RowResult`\\ s: this module
alone turns them into columns.
"""

from __future__ import annotations

import csv
import io
import json
import os
import typing
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Any

from blipserve.batch.rows import RowResult
from blipserve.batch.storage import Location
from blipserve.config import OutputFormat
from blipserve.errors import InvalidInput

FORMATS: tuple[str, ...] = typing.get_args(OutputFormat)
TABLE_COLUMNS = ("id", "text", "score", "error")
TEXTS_COLUMN = "texts"  # every text of a row, best first (a JSON array in CSV)
CAPFILT_COLUMNS = ("keep", "text_in", "text_in_score", "text_in_keep")
TEXT_SCORES_COLUMN = "text_scores"  # CapFilt of several texts: the kept texts' scores


def table_columns(*, several_texts: bool, capfilt: bool) -> tuple[str, ...]:
    """The columns of a job's table, decided by the job: a CSV or Parquet table has them
    all in every row (a failed row has no texts, nor CapFilt scores: empty there), JSON
    lines only those a row has past the first four."""
    return (
        TABLE_COLUMNS
        + ((TEXTS_COLUMN,) if several_texts else ())
        + (CAPFILT_COLUMNS if capfilt else ())
        + ((TEXT_SCORES_COLUMN,) if several_texts and capfilt else ())
    )


def infer_format(output: Location, explicit: str | None) -> str:
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
        f"cannot tell the format of '{output}' from its name; pass --format ({', '.join(FORMATS)})"
    )


def sidecar_text(result: RowResult, captions: str) -> str | None:
    """A sidecar's content: :meth:`~blipserve.batch.rows.RowResult.caption`, or with
    ``captions`` ``all`` every text of the row, one a line, best first (unless CapFilt kept
    the original text)."""
    text = result.caption()
    if captions == "all" and result.texts and text == result.text:
        return "\n".join(result.texts)
    return text


@dataclass(frozen=True)
class TableOutput:
    """A job's final output (every format but shards), written from the journal at the
    end: ``fmt`` to ``location``, with ``columns`` (:func:`table_columns`)."""

    fmt: str
    location: Location
    columns: tuple[str, ...] = TABLE_COLUMNS

    def write(self, results: Iterable[RowResult]) -> int:
        """Write it atomically; returns the number of rows written."""
        return write_output(self.fmt, self.location, results, self.columns)


def write_output(
    fmt: str,
    output: Location,
    results: Iterable[RowResult],
    columns: tuple[str, ...] = TABLE_COLUMNS,
) -> int:
    """Write the final output atomically; returns the number of rows written.  ``columns``:
    a table's (:func:`table_columns`)."""
    writers: dict[
        str, Callable[[IO[bytes], Iterable[RowResult], Location, tuple[str, ...]], int]
    ] = {
        "jsonl": _write_jsonl,
        "csv": _write_csv,
        "parquet": _write_parquet,
        "catalog": _write_catalog,
        "imagefolder": _write_imagefolder,
    }
    with output.writer() as f:
        return writers[fmt](f, results, output, columns)


def _columns(r: RowResult) -> dict[str, Any]:
    """A result's value in each table column (None: it has none)."""
    return {
        "id": r.id,
        "text": r.text,
        "score": r.score,
        "error": r.error,
        TEXTS_COLUMN: list(r.texts) if r.texts is not None else None,
        "keep": r.keep,
        "text_in": r.text_in,
        "text_in_score": r.text_in_score,
        "text_in_keep": r.text_in_keep,
        TEXT_SCORES_COLUMN: list(r.text_scores) if r.text_scores is not None else None,
    }


def _table_rows(
    results: Iterable[RowResult], columns: tuple[str, ...], *, sparse: bool = False
) -> Iterator[dict[str, Any]]:
    """Each result's row; ``sparse``: past :data:`TABLE_COLUMNS`, only those it has."""
    for r in results:
        values = _columns(r)
        row = {
            k: values[k]
            for k in columns
            if not sparse or k in TABLE_COLUMNS or values[k] is not None
        }
        row["text"] = row["text"] or ""
        row["error"] = row["error"] or ""
        yield row


def _write_jsonl(
    raw: IO[bytes], results: Iterable[RowResult], output: Location, columns: tuple[str, ...]
) -> int:
    n = 0
    with _text(raw) as f:
        for row in _table_rows(results, columns, sparse=True):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def _write_csv(
    raw: IO[bytes], results: Iterable[RowResult], output: Location, columns: tuple[str, ...]
) -> int:
    n = 0
    with _text(raw) as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in _table_rows(results, columns):
            if row.get(TEXTS_COLUMN) is not None:
                row[TEXTS_COLUMN] = json.dumps(row[TEXTS_COLUMN], ensure_ascii=False)
            writer.writerow({k: "" if v is None else v for k, v in row.items()})
            n += 1
    return n


def _write_parquet(
    raw: IO[bytes], results: Iterable[RowResult], output: Location, columns: tuple[str, ...]
) -> int:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise InvalidInput(
            "writing Parquet needs pyarrow: pip install 'blipserve[parquet]'"
        ) from None
    rows = list(_table_rows(results, columns))  # the text-only table is small
    # (typed: a column of a failed row alone, all nulls, would have no type of its own)
    types = {TEXTS_COLUMN: pa.list_(pa.string())}
    table = pa.table({c: pa.array([r[c] for r in rows], type=types.get(c)) for c in columns})
    pq.write_table(table, raw)
    return len(rows)


def _write_catalog(
    raw: IO[bytes], results: Iterable[RowResult], output: Location, columns: tuple[str, ...]
) -> int:
    """predictions.csv as the catalog's batch endpoints write it: row, prediction, file."""
    n = 0
    with _text(raw) as f:
        writer = csv.writer(f)
        for r in results:
            writer.writerow([r.row or "", r.caption() or "", r.source or ""])
            n += 1
    return n


def _write_imagefolder(
    raw: IO[bytes], results: Iterable[RowResult], output: Location, columns: tuple[str, ...]
) -> int:
    root = f"{output.parent}/"
    n = 0
    with _text(raw) as f:
        for r in results:
            text = r.caption()
            image = r.path
            if text is None or not image:
                continue
            if not str(image).startswith(root):
                raise InvalidInput(
                    f"imagefolder output: {image} is not inside {root}; write metadata.jsonl "
                    "into the image folder (e.g. --output IMAGES/metadata.jsonl)"
                )
            file_name = str(image)[len(root) :]
            f.write(json.dumps({"file_name": file_name, "text": text}, ensure_ascii=False) + "\n")
            n += 1
    return n


def sidecar_name(image_name: str, suffix: str) -> str:
    """``photo.jpg`` -> ``photo.txt`` for suffix ``.txt`` (or ``txt``)."""
    return os.path.splitext(image_name)[0] + (suffix if suffix.startswith(".") else f".{suffix}")


def sidecar_path(image: Location, suffix: str) -> Location:
    return image.with_name(sidecar_name(image.name, suffix))


def write_sidecar(where: Location, text: str) -> None:
    """Write a caption file atomically (a kill never leaves half a caption)."""
    where.write_bytes((text + "\n").encode())


class Sidecars:
    """A job's caption files next to its images (``--sidecar SUFFIX``), written as rows
    finish.  ``captions``: the best text or ``all``; ``locate``: an image's location (the
    job's guard applies); ``overwrite``: replace caption files that are there already."""

    def __init__(
        self, suffix: str, captions: str, locate: Callable[[str], Location], *, overwrite: bool
    ) -> None:
        self.suffix, self.captions, self.overwrite = suffix, captions, overwrite
        self._locate = locate
        self._kept: set[str] = set()  # images whose caption file was there already

    def keep(self, image: str) -> None:
        """The listing showed ``image``'s caption file: it is left alone."""
        self._kept.add(image)

    def write(self, result: RowResult) -> None:
        """``result``'s caption file, unless it has none (or one is there already)."""
        if not result.path:
            return
        text = sidecar_text(result, self.captions)
        if text is None:
            return
        target = sidecar_path(self._locate(result.path), self.suffix)
        if not self.overwrite and self._there(result, target):
            return
        write_sidecar(target, text)

    def _there(self, result: RowResult, target: Location) -> bool:
        """For an image in a folder the listing told; for a table's image file, ask."""
        if result.path in self._kept:
            return True
        return bool(result.row) and target.exists()


def _text(raw: IO[bytes]) -> io.TextIOWrapper:
    """Text over the binary output; detached at the end so the writer can sync and close it."""
    return _Detaching(raw, encoding="utf-8", newline="")


class _Detaching(io.TextIOWrapper):
    def __exit__(self, *exc: object) -> None:
        self.flush()
        self.detach()
