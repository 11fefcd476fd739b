"""The batch endpoint's jobs: taken, queued, run one after another, watched, canceled.

:class:`JobHost` owns the job table (:mod:`~blipserve.jobs.table`) for the server.  A job
is ``blipserve batch`` on its input and output: a :class:`~blipserve.batch.runner.BatchJob`
on the server's engine behind the requests (:mod:`~blipserve.jobs.behind`), or, with
``--jobs-on-ray``, ``blipserve batch --ray``'s driver, the rows on the Ray cluster.  The
same journal, so a job that stops for any reason (canceled, the server stopped or
killed, a store that failed) resumes where it was when it runs again, and every input
row is answered once.

One scheduler thread starts queued jobs in the order they came (``--max-running-jobs``
at once, each on a thread of its own), renews their leases, saves their progress, and
looks at the table for jobs and cancel requests from other servers sharing the folder.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from blipserve.batch.journal import ForeignOutput
from blipserve.batch.options import BatchOptions, Summary, TooManyFailures
from blipserve.batch.storage import Location, StorageError, locate
from blipserve.config import Settings, values_of
from blipserve.contracts.batch_jobs import JobSpec
from blipserve.errors import (
    BlipserveError,
    Conflict,
    InvalidInput,
    JobNotFound,
    JobStopped,
    TooManyJobs,
)
from blipserve.jobs import table as t
from blipserve.jobs.submit import resolve_job
from blipserve.jobs.table import JobRecord, JobTable
from blipserve.jobs.uris import UriResolver

log = logging.getLogger(__name__)

#: runs one job: (options, stop event) -> summary; the host's engine or Ray
RunJob = Callable[[BatchOptions, threading.Event, Callable[[Any], None]], Summary]
SAVE_EVERY_S = 2.0
RETRY_WAIT_S = 5.0


@dataclass
class _Running:
    record: JobRecord
    stop: threading.Event = field(default_factory=threading.Event)
    cancel: bool = False
    book: Any = None  # the job's JobBook once it runs (its summary is the live count)
    thread: threading.Thread | None = None
    saved: float = 0.0


class JobHost:
    """The server's batch jobs (``POST /jobs``)."""

    def __init__(self, settings: Settings, folder: Location | None = None) -> None:
        cfg = settings.jobs
        assert cfg.jobs_dir is not None, "batch jobs are on only with --jobs-dir"
        self.settings = settings
        self.config = cfg
        self.table = JobTable(folder or locate(cfg.jobs_dir, settings.batch.storage_options))
        self.resolver = UriResolver(
            cfg.datastore, cfg.jobs_allow_root, settings.batch.storage_options
        )
        self.output_root = cfg.jobs_output_root or str(self.table.folder.child("outputs"))
        self._records: dict[str, JobRecord] = {}
        self._running: dict[str, _Running] = {}
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._stopping = False
        self._run_job: RunJob | None = None
        self._thread: threading.Thread | None = None
        self._refreshed = 0.0
        # the catalog's logging_level: the jobs' own lines (progress, failed rows, ends)
        for name in ("blipserve.batch", "blipserve.jobs"):
            logging.getLogger(name).setLevel(cfg.job_log_level.upper())
        self.refresh()

    # -- what the routes call (blocking: from a worker thread) -------------------------------

    def submit(self, spec: JobSpec) -> JobRecord:
        """Check a job's input and output and queue it; raises the 4xx naming the field."""
        with self._lock:
            waiting = [r for r in self._records.values() if not r.finished]
        if len(waiting) >= self.config.max_waiting_jobs:
            raise TooManyJobs(
                f"{len(waiting)} jobs are queued or running, as many as this server takes "
                "(--max-waiting-jobs); retry when one has ended"
            )
        record = resolve_job(self, spec, t.new_job_name())
        with self._lock:
            for other in self._records.values():
                if not other.finished and other.output == record.output:
                    raise Conflict(
                        f"properties.OutputData: job {other.name} ({other.status}) writes "
                        f"{record.output} already"
                    )
            self.table.save(record)
            self._records[record.name] = record
            self._forget_old()
            self._wake.notify_all()
        log.info("job %s queued: %s -> %s", record.name, record.input, record.output)
        return record

    def get(self, name: str) -> JobRecord:
        """The job now: live counts where it runs here, else its record in the table."""
        with self._lock:
            running = self._running.get(name)
            if running is not None:
                self._count(running)
                return dataclasses.replace(running.record)
        record = self.table.load(name) if _safe_name(name) else None
        if record is None:
            raise JobNotFound(f"no batch job named {name!r} on this server")
        with self._lock:
            self._records[name] = record
        return record

    def jobs(self) -> list[JobRecord]:
        """Every job in the table, newest first."""
        self.refresh(max_age_s=2.0)
        with self._lock:
            for running in self._running.values():
                self._count(running)
            return sorted(self._records.values(), key=lambda r: -r.created)

    def cancel(self, name: str) -> JobRecord:
        """Cancel: a queued job at once; a running one at its next chunk (its done rows
        stay journaled).  A finished job cannot be canceled (409)."""
        record = self.get(name)
        with self._lock:
            if record.finished:
                raise Conflict(f"job {name} has ended ({record.status}); nothing to cancel")
            running = self._running.get(name)
            if running is not None:
                running.cancel = True
                running.stop.set()
                running.record.status = t.CANCEL_REQUESTED
                self.table.save(running.record)
                return dataclasses.replace(running.record)
            # queued here, or running on another server (which sees the request and stops)
            record.status = t.CANCEL_REQUESTED if record.server else t.CANCELED
            if record.status == t.CANCELED:
                record.ended = time.time()
            self.table.save(record)
            self._records[name] = record
            return record

    # -- life -----------------------------------------------------------------------------------

    def start(self, run_job: RunJob) -> None:
        """Start running jobs with ``run_job`` (the server's engine is ready)."""
        self._run_job = run_job
        self._thread = threading.Thread(target=self._schedule, name="blipserve-jobs", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop every running job where it is (each stays in the table, resumed by the next
        server), then the scheduler."""
        with self._lock:
            self._stopping = True
            running = list(self._running.values())
            for job in running:
                job.stop.set()
            self._wake.notify_all()
        deadline = time.monotonic() + timeout
        for job in running:
            if job.thread is not None:
                job.thread.join(max(0.1, deadline - time.monotonic()))
        if self._thread is not None:
            self._thread.join(max(0.1, deadline - time.monotonic()))

    # -- the scheduler ------------------------------------------------------------------------

    def refresh(self, max_age_s: float = 0.0) -> None:
        """Read the table again: new jobs (another server's), cancel requests, ends."""
        if time.monotonic() - self._refreshed < max_age_s:
            return
        self._refreshed = time.monotonic()
        names = self.table.names()
        with self._lock:
            known = dict(self._records)
        for name in names:
            record = known.get(name)
            if name in self._running or (record is not None and record.finished):
                continue
            fresh = self.table.load(name)
            if fresh is not None:
                with self._lock:
                    self._records[name] = fresh
        with self._lock:
            for name in set(self._records) - set(names) - set(self._running):
                del self._records[name]

    def _schedule(self) -> None:
        while True:
            with self._lock:
                if self._stopping:
                    return
            try:
                self.refresh(max_age_s=SAVE_EVERY_S)
                self._tend()
                self._start_next()
            except Exception:  # a store that fails now; the jobs' own errors are theirs
                log.exception("the job scheduler's round failed; trying again")
            with self._lock:
                if not self._stopping:
                    self._wake.wait(1.0)

    def _tend(self) -> None:
        """Save running jobs' progress; renew their leases; pass on cancel requests."""
        with self._lock:
            running = list(self._running.values())
        for job in running:
            name = job.record.name
            on_disk = self._records.get(name)
            if on_disk is not None and on_disk.status == t.CANCEL_REQUESTED and not job.cancel:
                job.cancel = True
                job.stop.set()
            if time.monotonic() - job.saved >= SAVE_EVERY_S:
                if not self.table.renew(name):
                    log.warning("job %s: another server holds its lease; stopping here", name)
                    job.stop.set()
                with self._lock:
                    self._count(job)
                    self.table.save(job.record)
                job.saved = time.monotonic()

    def _start_next(self) -> None:
        with self._lock:
            free = self.config.max_running_jobs - len(self._running)
            queued = sorted(
                (
                    r
                    for r in self._records.values()
                    if not r.finished and r.name not in self._running
                ),
                key=lambda r: r.created,
            )
        for record in queued:
            if free <= 0:
                return
            if not self.table.take(record.name):
                continue  # another server runs it
            fresh = self.table.load(record.name) or record
            if fresh.finished:
                self.table.release(record.name)
                continue
            if fresh.status == t.CANCEL_REQUESTED:  # its server went before it could stop
                self._end(fresh, t.CANCELED)
                self.table.release(record.name)
                continue
            job = _Running(fresh)
            job.thread = threading.Thread(
                target=self._run, args=(job,), name=f"blipserve-job-{fresh.name[-8:]}", daemon=True
            )
            with self._lock:
                if self._stopping:  # (stop() joins every thread it finds here: start none)
                    self.table.release(record.name)
                    return
                self._running[fresh.name] = job
                self._records[fresh.name] = fresh
                job.thread.start()
            free -= 1

    # -- one job --------------------------------------------------------------------------------

    def _run(self, job: _Running) -> None:
        record = job.record
        assert self._run_job is not None
        try:
            self._attempts(job)
            self._end(record, t.COMPLETED)
        except JobStopped:
            if job.cancel:
                self._end(record, t.CANCELED)
            else:  # the server stops: the next one resumes it
                record.status = t.QUEUED
                self._save(record)
        except TooManyFailures as exc:
            self._end(record, t.FAILED, "TooManyFailures", exc.message)
        except BlipserveError as exc:
            code = "StorageError" if isinstance(exc, StorageError) else type(exc).__name__
            self._end(record, t.FAILED, code, exc.message)
        except Exception as exc:
            log.exception("job %s failed", record.name)
            self._end(record, t.FAILED, "InternalError", f"{type(exc).__name__}: {exc}")
        finally:
            self.table.release(record.name)
            with self._lock:
                self._running.pop(record.name, None)
                self._wake.notify_all()

    def _attempts(self, job: _Running) -> None:
        """Run the job; again from its journal after a storage error (``--job-retries``)."""
        record = job.record
        assert self._run_job is not None
        while True:
            record.attempts += 1
            record.status, record.server = t.STARTING, self.table.server_id
            record.started = record.started or time.time()
            record.error = None
            self._save(record)
            try:
                summary = self._run_job(self._options(record), job.stop, self._runs(job))
            except ForeignOutput:
                raise  # (another job's output: retrying will not help)
            except StorageError as exc:
                if job.stop.is_set() or record.attempts > self.config.job_retries:
                    raise
                log.warning(
                    "job %s: %s; trying again (%d)", record.name, exc.message, record.attempts
                )
                record.error = {"code": "StorageError", "message": exc.message}
                self._save(record)
                if job.stop.wait(RETRY_WAIT_S * record.attempts):
                    raise JobStopped("the job was stopped") from None
                continue
            self._counts_from(record, summary)
            return

    def _runs(self, job: _Running) -> Callable[[Any], None]:
        def running(book: Any) -> None:  # the job's book, once it is open
            with self._lock:
                job.book = book
                if job.record.status == t.STARTING:
                    job.record.status = t.RUNNING
            self._save(job.record)

        return running

    def _options(self, record: JobRecord) -> BatchOptions:
        spec, batch = record.spec, self.settings.batch
        values = values_of(batch) | {
            "input": record.input,
            "output": record.output,
            "params": spec.params,
            "guard": self.resolver.guard,  # (a table's image paths too)
        }
        for name in ("format", "text_from", "prompt", "caption_key", "retry_errors"):
            if name in spec.overrides:
                values[name] = spec.overrides[name]
        values["progress"] = False
        try:
            return BatchOptions(**values)
        except ValueError as exc:
            raise InvalidInput(f"properties.blipserve: {exc}") from None

    def _count(self, job: _Running) -> None:
        """Copy the live counts of a running job into its record (under the lock)."""
        book = job.book
        if book is None:
            return
        s, r = book.summary, job.record
        r.done, r.failed, r.skipped, r.total = s.done, s.failed, s.skipped, book.total
        elapsed = book.elapsed_s
        r.rows_per_s = round((s.done + s.failed) / elapsed, 3) if elapsed > 0 else 0.0

    def _counts_from(self, record: JobRecord, summary: Summary) -> None:
        record.done, record.failed, record.skipped = summary.done, summary.failed, summary.skipped
        record.total = summary.done + summary.failed + summary.skipped  # (every input row)
        record.rows_per_s = round(summary.images_per_s, 3)

    def _end(self, record: JobRecord, status: str, code: str = "", message: str = "") -> None:
        record.status, record.ended = status, time.time()
        record.error = {"code": code, "message": message} if message else None
        if message:
            log.warning("job %s %s: %s", record.name, status.lower(), message)
        else:
            log.info("job %s %s", record.name, status.lower())
        self._save(record)

    def _save(self, record: JobRecord) -> None:
        with self._lock:
            self.table.save(record)
            self._records[record.name] = record

    def _forget_old(self) -> None:
        ended = sorted((r for r in self._records.values() if r.finished), key=lambda r: r.created)
        for old in ended[: max(0, len(ended) - self.config.jobs_kept)]:
            self.table.forget(old.name)
            del self._records[old.name]


def _safe_name(name: str) -> bool:
    return 0 < len(name) <= 100 and all(c.isalnum() or c in "-_." for c in name) and name[0] != "."


__all__ = ["JobHost", "RunJob"]
