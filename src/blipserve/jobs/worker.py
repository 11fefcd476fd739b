"""One hosted job running on this server: its options, its tries, its live counts, how it
ends.  :class:`~blipserve.jobs.host.JobHost` starts a :class:`JobWorker` on a thread of its
own once it holds the job's lease (and its output's), and is told when it has ended."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from blipserve.batch.book import JobBook
from blipserve.batch.journal import ForeignOutput
from blipserve.batch.options import BatchOptions, Summary, TooManyFailures
from blipserve.batch.storage import StorageError
from blipserve.config import Settings
from blipserve.errors import BlipserveError, InvalidInput, JobStopped
from blipserve.jobs import table as t
from blipserve.jobs.table import JobRecord
from blipserve.jobs.uris import AllowedRoots

log = logging.getLogger(__name__)

#: runs one job: (options, stop event, told the job's book once open) -> its summary
RunJob = Callable[[BatchOptions, threading.Event, Callable[[JobBook | None], None]], Summary]
RETRY_WAIT_S = 5.0
# the server's batch options a hosted job takes (the rest are the job's own, or off: a
# server's BLIPSERVE_SIDECAR or BLIPSERVE_FILTER_MODEL is not every client's job's)
SERVER_OPTIONS = (
    "chunk_rows",
    "read_workers",
    "max_failures",
    "log_every_s",
    "storage_options",
    "sidecar_captions",
    "caption_key",
    "retry_errors",
)
JOB_OPTIONS = ("format", "text_from", "prompt", "caption_key", "retry_errors")


def job_options(settings: Settings, record: JobRecord, guard: AllowedRoots) -> BatchOptions:
    """The ``blipserve batch`` options of a hosted job: the server's settings that apply to
    every job, the job's own, and ``guard`` (only files under the allowed roots, and its
    output, checked when the job was taken: summary_only's is the server's own)."""
    batch, spec = settings.batch, record.spec
    guard = AllowedRoots((*guard.roots, record.output), guard.denied)
    values: dict[str, Any] = {name: getattr(batch, name) for name in SERVER_OPTIONS}
    values.update({name: spec.overrides[name] for name in JOB_OPTIONS if name in spec.overrides})
    try:
        return BatchOptions(
            input=record.input,
            output=record.output,
            params=spec.params,
            guard=guard,
            progress=False,
            **values,
        )
    except ValueError as exc:
        raise InvalidInput(f"properties.blipserve: {exc}") from None


class JobWorker:
    """Runs ``record``'s job with ``run_job``; ``save`` writes its record (the host's table
    and memory), ``finished`` is told once it has ended."""

    def __init__(
        self,
        record: JobRecord,
        options: Callable[[JobRecord], BatchOptions],
        run_job: RunJob,
        retries: int,
        save: Callable[[JobRecord], None],
        finished: Callable[[JobWorker], None],
    ) -> None:
        self.record = record
        self.stop = threading.Event()
        self.canceled = False  # (stop set by a cancel: the job ends Canceled)
        self.lost = False  # another server holds its lease now: write nothing more
        self.saved = self.renewed = time.monotonic()
        self._options, self._run_job, self._retries = options, run_job, retries
        self._save, self._finished = save, finished
        self._book: JobBook | None = None
        self.thread = threading.Thread(
            target=self._run, name=f"blipserve-job-{record.name[-8:]}", daemon=True
        )

    def cancel(self) -> None:
        self.canceled = True
        self.stop.set()

    def counts(self) -> None:
        """Copy the job's live counts into its record (the host holds its lock)."""
        book, r = self._book, self.record
        if book is None or r.finished:
            return
        s = book.summary
        r.done, r.failed, r.skipped, r.total = s.done, s.failed, s.skipped, book.total
        elapsed = book.elapsed_s
        r.rows_per_s = round((s.done + s.failed) / elapsed, 3) if elapsed > 0 else 0.0

    # -- the job's thread -----------------------------------------------------------------------

    def _run(self) -> None:
        record = self.record
        try:
            self._tries()
            self._end(t.COMPLETED)
        except JobStopped:
            if self.canceled:
                self._end(t.CANCELED)
            else:  # the server stops (or lost the lease): the job waits for the next one
                record.status = t.QUEUED
        except ForeignOutput:
            message = (
                "the output's journal belongs to another job (another input, model or "
                "parameters): choose another output"
            )
            self._end(t.FAILED, "Conflict", message)
        except TooManyFailures as exc:
            self._end(t.FAILED, "TooManyFailures", exc.message)
        except BlipserveError as exc:
            code = "StorageError" if isinstance(exc, StorageError) else type(exc).__name__
            self._end(t.FAILED, code, exc.message)
        except Exception as exc:
            log.exception("job %s failed", record.name)
            self._end(t.FAILED, "InternalError", f"{type(exc).__name__}: {exc}")
        finally:
            self._finished(self)

    def _tries(self) -> None:
        """Run the job; again from its journal after a storage error (``--job-retries``;
        a restart of the server is not one of them)."""
        record, retried = self.record, 0
        while True:
            record.attempts += 1
            record.status, record.error = t.STARTING, None
            record.started = record.started or time.time()
            self._write(record)
            try:
                summary = self._run_job(self._options(record), self.stop, self._opened)
            except ForeignOutput:
                raise
            except StorageError as exc:
                retried += 1
                if self.stop.is_set() or retried > self._retries:
                    raise
                log.warning("job %s: %s; trying again (%d)", record.name, exc.message, retried)
                record.error = {"code": "StorageError", "message": exc.message}
                self._write(record)
                if self.stop.wait(RETRY_WAIT_S * retried):
                    raise JobStopped("the job was stopped") from None
                continue
            s = summary
            record.done, record.failed, record.skipped = s.done, s.failed, s.skipped
            record.total = s.done + s.failed + s.skipped  # (every input row)
            record.rows_per_s = round(s.images_per_s, 3)
            return

    def _opened(self, book: JobBook | None) -> None:
        self._book = book
        self.record.status = t.RUNNING
        self._write(self.record)

    def _write(self, record: JobRecord) -> None:
        if not self.lost:  # (else the record is the new holder's to write)
            self._save(record)

    def _end(self, status: str, code: str = "", message: str = "") -> None:
        end(self.record, status, code, message)


def end(record: JobRecord, status: str, code: str = "", message: str = "") -> None:
    """Mark ``record`` ended (the caller saves it)."""
    record.status, record.ended = status, time.time()
    record.error = {"code": code, "message": message} if message else None
    if message:
        log.warning("job %s %s: %s", record.name, status.lower(), message)
    else:
        log.info("job %s %s", record.name, status.lower())


__all__ = ["JobWorker", "RunJob", "end", "job_options"]
