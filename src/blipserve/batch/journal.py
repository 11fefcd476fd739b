"""A durable record of finished rows: what makes a batch job resumable.

On a local disk (:class:`Journal`) each finished row is one JSON line, written and
``fsync``-ed before the job moves on, so a SIGKILL loses at most the rows being computed.
A line cut short by a kill is detected and dropped on the next open (it has no newline),
so every row is either fully recorded or not at all.  The first line holds the job's
signature: a rerun of a *different* job on the same output is refused instead of silently
mixing results.

Object stores have no append and no fsync, but one object is put atomically, so there
(:class:`PartsJournal`) each finished chunk of rows is one small object, ``part-N``, in a
hidden folder beside the output, next to ``signature.json``.  A part is there whole or not
at all; a resumed job merges the parts it finds into one.  Either way a row may be
recorded twice (a kill between a part's put and the old parts' removal): the last record
of an id wins, so the output holds every input row exactly once.

Rows are :class:`~blipserve.batch.rows.RowResult`\\ s; this module alone turns them into
journal lines and back (:func:`result_line`, :func:`result_of_line`), in the same bytes
as ever, so a journal written by any earlier version resumes.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from blipserve.batch.rows import RowResult
from blipserve.batch.storage import Location, OutputError

_Line = dict[str, Any]  # one journal line, as JSON: read and written here only


class ForeignOutput(OutputError):
    """The output's journal is another job's (another input, model or parameters): this
    job may not resume it, now or after any number of tries."""


class JobJournal(Protocol):
    """What a job needs of its journal, on a local disk or in an object store."""

    def open(self, *, overwrite: bool) -> dict[str, bool]: ...
    def append(self, results: Sequence[RowResult]) -> None: ...
    def close(self) -> None: ...
    def merge(self) -> None: ...
    def records(self) -> Iterator[RowResult]: ...


def open_journal(output: Location, signature: Mapping[str, Any]) -> JobJournal:
    """The journal of the job writing ``output`` (hidden, beside it)."""
    if output.local:
        return Journal(Path(output.with_name(f".{output.name}.journal.jsonl").path), signature)
    return PartsJournal(output.with_name(f".{output.name}.journal"), signature)


class Journal:
    """The local journal: one append-only JSON-lines file, fsync-ed per chunk."""

    def __init__(self, path: Path, signature: Mapping[str, Any]) -> None:
        self.path = self.where = path
        self.signature = dict(signature)
        self._file: Any = None

    def open(self, *, overwrite: bool) -> dict[str, bool]:
        """Start or resume; returns ``{row id: succeeded}`` for rows already recorded."""
        done: dict[str, bool] = {}
        try:
            if self.path.parent.exists() and not self.path.parent.is_dir():
                raise OutputError(f"cannot write {self.path}: {self.path.parent} is not a folder")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if overwrite or not self.path.exists():
                self._start_fresh()
                return done
            good_bytes = 0
            with self.path.open("rb") as f:
                header = f.readline()
                if not header.endswith(b"\n") or _load(header).get("signature") != self.signature:
                    found = _load(header).get("signature")
                    raise ForeignOutput(
                        f"{self.path} belongs to a different job ({found}); rerun with "
                        "--overwrite to start over, or choose another --output"
                    )
                good_bytes = len(header)
                for line in f:
                    if not line.endswith(b"\n"):
                        break  # cut short by a kill: this row was not finished
                    line_of = _load(line)
                    if "id" in line_of:
                        done[line_of["id"]] = not line_of.get("error")
                    good_bytes += len(line)
            with self.path.open("r+b") as f:
                f.truncate(good_bytes)
            self._file = self.path.open("ab")
        except OSError as exc:
            raise OutputError(f"cannot write {self.path}: {exc.strerror or exc}") from None
        return done

    def _start_fresh(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("wb") as f:
            f.write(_dump({"signature": self.signature}))
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.path)
        self._file = self.path.open("ab")

    def append(self, results: Sequence[RowResult]) -> None:
        """Record finished rows durably (written and fsync-ed) before returning."""
        if not results:
            return
        try:
            self._file.write(b"".join(result_line(r) for r in results))
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as exc:
            # Let the file go now: closing it later would retry the failed write and raise
            # a bare OSError over this clear error (a partial line is dropped on resume).
            file, self._file = self._file, None
            with contextlib.suppress(OSError):
                file.close()
            raise OutputError(f"cannot write {self.path}: {exc.strerror or exc}") from None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def merge(self) -> None:
        pass  # one file already

    def records(self) -> Iterator[RowResult]:
        """Every recorded row once (the last record of an id wins), in recording order."""
        return map(_result, _last_of_each(self._scan))

    def _scan(self) -> Iterator[_Line]:
        with self.path.open("rb") as f:
            f.readline()  # signature
            for line in f:
                if line.endswith(b"\n"):
                    found = _load(line)
                    if "id" in found:
                        yield found


class PartsJournal:
    """The object-store journal: ``signature.json`` and one object per finished chunk."""

    def __init__(self, folder: Location, signature: Mapping[str, Any]) -> None:
        self.where = folder
        self.signature = dict(signature)
        self._next = 0
        self._token = uuid.uuid4().hex[:8]  # two drivers on one output never overwrite

    def open(self, *, overwrite: bool) -> dict[str, bool]:
        head = self.where.child("signature.json")
        if overwrite:
            self.where.remove(recursive=True)
        try:
            found = _load(head.read_bytes()).get("signature")
        except FileNotFoundError:
            found = None
        if found is None:
            self.where.remove(recursive=True)  # parts without a signature: not a job's
            head.write_bytes(_dump({"signature": self.signature}))
            return {}
        if found != self.signature:
            raise ForeignOutput(
                f"{self.where} belongs to a different job ({found}); rerun with "
                "--overwrite to start over, or choose another --output"
            )
        done = {r["id"]: not r.get("error") for r in _last_of_each(self._scan)}
        self.merge()
        return done

    def append(self, results: Sequence[RowResult]) -> None:
        """Record finished rows durably: one object, put whole, before returning."""
        if results:
            self._put(b"".join(result_line(r) for r in results))

    def close(self) -> None:
        pass

    def records(self) -> Iterator[RowResult]:
        """Every recorded row once (the last record of an id wins), in recording order."""
        return map(_result, _last_of_each(self._scan))

    def _parts(self) -> list[Location]:
        try:
            entries = self.where.listing()
        except FileNotFoundError:
            return []
        parts = [self.where.entry(e) for e in entries if e.get("type") == "file"]
        parts = [p for p in parts if p.name.startswith("part-") and p.name.endswith(".jsonl")]
        if parts:
            self._next = max(self._next, int(parts[-1].name.split("-")[1]) + 1)
        return parts

    def _scan(self) -> Iterator[_Line]:
        for part in self._parts():
            for line in part.read_bytes().splitlines(keepends=True):
                found = _load(line)
                if "id" in found and line.endswith(b"\n"):
                    yield found

    def merge(self) -> None:
        """Put the parts found into one (so listings stay short), then remove them."""
        old = self._parts()
        if len(old) > 1:
            self._put(b"".join(_dump(line) for line in _last_of_each(self._scan)))
            for part in old:
                part.remove()

    def _put(self, data: bytes) -> None:
        name = f"part-{self._next:010d}-{self._token}.jsonl"
        self._next += 1
        self.where.child(name).write_bytes(data)


def _last_of_each(scan: Callable[[], Iterator[_Line]]) -> Iterator[_Line]:
    """The lines of ``scan()`` (called twice), each id once: its last line, in order."""
    last: dict[str, int] = {}
    for n, line in enumerate(scan()):
        last[line["id"]] = n
    for n, line in enumerate(scan()):
        if last[line["id"]] == n:
            yield line


def result_line(result: RowResult) -> bytes:
    """``result`` as a journal line: JSON, its keys in the order every version wrote them
    (``texts`` and CapFilt's only where the row has them)."""
    r = result
    line: _Line = {"id": r.id, "text": r.text, "score": r.score, "error": r.error}
    if r.texts is not None:
        line["texts"] = list(r.texts)
    line.update(source=r.source, row=r.row, path=r.path)
    capfilt = {
        "text_in": r.text_in,
        "text_in_score": r.text_in_score,
        "text_in_keep": r.text_in_keep,
        "keep": r.keep,
        "text_scores": list(r.text_scores) if r.text_scores is not None else None,
    }
    line.update((key, value) for key, value in capfilt.items() if value is not None)
    return _dump(line)


def result_of_line(line: bytes | str) -> RowResult | None:
    """The row's result a journal line holds (None: the signature's line, or no JSON)."""
    found = _load(line)
    return _result(found) if "id" in found else None


def _result(line: _Line) -> RowResult:
    texts, text_scores = line.get("texts"), line.get("text_scores")
    return RowResult(
        id=line["id"],
        text=line.get("text") or "",
        score=line.get("score"),
        error=line.get("error") or "",
        texts=tuple(texts) if texts is not None else None,
        source=line.get("source"),
        row=line.get("row"),
        path=line.get("path"),
        text_in=line.get("text_in"),
        text_in_score=line.get("text_in_score"),
        text_in_keep=line.get("text_in_keep"),
        keep=line.get("keep"),
        text_scores=tuple(text_scores) if text_scores is not None else None,
    )


def _dump(line: Mapping[str, Any]) -> bytes:
    return (json.dumps(line, ensure_ascii=False) + "\n").encode()


def _load(line: bytes | str) -> _Line:
    try:
        value = json.loads(line)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


__all__ = [
    "JobJournal",
    "Journal",
    "OutputError",
    "PartsJournal",
    "open_journal",
    "result_line",
    "result_of_line",
]
