"""A durable, append-only record of finished rows: what makes a batch job resumable.

Each finished row is one JSON line, written and ``fsync``-ed before the job moves on, so a
SIGKILL loses at most the rows being computed.  A line cut short by a kill is detected and
dropped on the next open (it has no newline), so every row is either fully recorded or not
at all.  The first line holds the job's signature: a rerun of a *different* job on the same
output is refused instead of silently mixing results.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from blipserve.errors import BlipserveError

Record = dict[str, Any]


class OutputError(BlipserveError):
    """The output location cannot be written (permissions, full disk, a different job)."""

    status = 500


class Journal:
    def __init__(self, path: Path, signature: Mapping[str, Any]) -> None:
        self.path = path
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
                    raise OutputError(
                        f"{self.path} belongs to a different job ({found}); rerun with "
                        "--overwrite to start over, or choose another --output"
                    )
                good_bytes = len(header)
                for line in f:
                    if not line.endswith(b"\n"):
                        break  # cut short by a kill: this row was not finished
                    record = _load(line)
                    if "id" in record:
                        done[record["id"]] = not record.get("error")
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

    def append(self, records: Sequence[Record]) -> None:
        """Record finished rows durably (written and fsync-ed) before returning."""
        if not records:
            return
        try:
            self._file.write(b"".join(_dump(r) for r in records))
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

    def records(self) -> Iterator[Record]:
        """Every recorded row once (the last record of an id wins), in recording order."""
        last: dict[str, int] = {}
        for n, record in enumerate(self._scan()):
            last[record["id"]] = n
        for n, record in enumerate(self._scan()):
            if last[record["id"]] == n:
                yield record

    def _scan(self) -> Iterator[Record]:
        with self.path.open("rb") as f:
            f.readline()  # signature
            for line in f:
                if line.endswith(b"\n"):
                    record = _load(line)
                    if "id" in record:
                        yield record


def _dump(record: Mapping[str, Any]) -> bytes:
    return (json.dumps(record, ensure_ascii=False) + "\n").encode()


def _load(line: bytes) -> Record:
    try:
        value = json.loads(line)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
