"""The batch endpoint's jobs: taken, queued, run one after another, watched, canceled.

:class:`JobHost` owns the job table (:mod:`~blipserve.jobs.table`) for the server.  A job
is ``blipserve batch`` on its input and output (:mod:`~blipserve.jobs.worker`): on the
server's engine behind the requests (:mod:`~blipserve.jobs.behind`), or with
``--jobs-on-ray`` as ``blipserve batch --ray`` runs it.  The same journal, so a job that
stops for any reason (canceled, the server stopped or killed, a store that failed)
resumes where it was when it runs again: every input row is answered once.

One scheduler thread starts queued jobs in the order they came (``--max-running-jobs``
at once), renews their leases, saves their progress, and reads the table for jobs and
cancel requests from other servers sharing the folder.  A record is written by the server
that holds its job's lease (or, for a job no server runs, by the one that takes it to
cancel it); a cancel for a job running elsewhere is a marker its server reads.  A job
also holds its output's lease while it runs: two jobs never write one output at once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
import time
from collections import Counter

from blipserve.batch.storage import Location, StorageError, locate
from blipserve.config import Settings
from blipserve.contracts.batch_jobs import JobSpec
from blipserve.errors import Conflict, JobNotFound, TooManyJobs
from blipserve.jobs import table as t
from blipserve.jobs.submit import resolve_job
from blipserve.jobs.table import JobRecord, JobTable
from blipserve.jobs.uris import UriResolver
from blipserve.jobs.worker import JobWorker, RunJob, end, job_options

log = logging.getLogger(__name__)

SAVE_EVERY_S = 2.0  # progress into the table
RENEW_EVERY_S = t.LEASE_S / 3


class JobHost:
    """The server's batch jobs (``POST /jobs``)."""

    def __init__(self, settings: Settings, folder: Location | None = None) -> None:
        cfg = settings.jobs
        assert cfg.jobs_dir is not None, "batch jobs are on only with --jobs-dir"
        self.settings, self.config = settings, cfg
        options = settings.batch.storage_options
        self.table = JobTable(folder or locate(cfg.jobs_dir, options))
        self.output_root = cfg.jobs_output_root or str(self.table.folder.child("outputs"))
        # the table's own files are no job's to read or write, even under an allowed root
        private = tuple(str(self.table.folder.child(n)) for n in ("jobs", "leases", "cancels"))
        self.resolver = UriResolver(cfg.datastore, cfg.jobs_allow_root, options, private)
        self._records: dict[str, JobRecord] = {}
        self._running: dict[str, JobWorker] = {}
        self._lock = threading.RLock()  # the records in memory
        self._claim = threading.Lock()  # taking a job's lease: the scheduler or a cancel
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
        self._room()
        record = resolve_job(self, spec, t.new_job_name())
        with self._lock:
            self._room()
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

    def _room(self) -> None:
        with self._lock:
            waiting = sum(not r.finished for r in self._records.values())
        if waiting >= self.config.max_waiting_jobs:
            raise TooManyJobs(
                f"{waiting} jobs are queued or running, as many as this server takes "
                "(--max-waiting-jobs); retry when one has ended"
            )

    def get(self, name: str) -> JobRecord:
        """The job now: live counts where it runs here, else its record in the table.

        A worker that has ended is read from the table too: its end shows once it is saved
        there (``_finished``), so that no server reports it before another can."""
        with self._lock:
            worker = self._running.get(name)
            if worker is not None and not worker.record.finished:
                worker.counts()
                return dataclasses.replace(worker.record)
        record = self.table.load(name) if _safe_name(name) else None
        if record is None:
            raise JobNotFound(f"no batch job named {name!r} on this server")
        self._remember(record)
        return record

    def jobs(self) -> list[JobRecord]:
        """Every job in the table, newest first."""
        self.refresh(max_age_s=SAVE_EVERY_S)
        with self._lock:
            for worker in self._running.values():
                worker.counts()
            return [
                dataclasses.replace(r)
                for r in sorted(self._records.values(), key=lambda r: -r.created)
            ]

    def counts(self) -> dict[str, int]:
        """Jobs by status, as this server last read the table (no store call)."""
        with self._lock:
            found = Counter(r.status for r in self._records.values())
        return {status: found.get(status, 0) for status in t.STATUSES}

    def cancel(self, name: str) -> JobRecord:
        """Cancel: a queued job at once; a running one after its chunk in hand (its done
        rows stay journaled), here or on the server running it.  409 once it has ended."""
        record = self.get(name)
        if record.finished:
            raise Conflict(f"job {name} has ended ({record.status}); nothing to cancel")
        with self._claim:
            with self._lock:
                if (worker := self._running.get(name)) is not None:
                    worker.cancel()
                    worker.record.status = t.CANCEL_REQUESTED
                    self.table.save(worker.record)
                    return dataclasses.replace(worker.record)
            self.table.request_cancel(name)  # (read by the server that runs it, if one does)
            if not self.table.take(name):
                record.status = t.CANCEL_REQUESTED
                return record
            try:  # nobody runs it: it ends here
                fresh = self.table.load(name) or record
                if not fresh.finished:
                    end(fresh, t.CANCELED)
                    self._save(fresh)
                self.table.clear_cancel(name)
                return fresh
            finally:
                self.table.release(name)

    # -- life -----------------------------------------------------------------------------------

    def start(self, run_job: RunJob) -> None:
        """Start running jobs with ``run_job`` (the server's engine is ready)."""
        self._run_job = run_job
        self._thread = threading.Thread(target=self._schedule, name="blipserve-jobs", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop every running job where it is (each goes back to the queue, resumed by the
        next server), then the scheduler."""
        with self._lock:
            self._stopping = True
            running = list(self._running.values())
            for worker in running:
                worker.stop.set()
            self._wake.notify_all()
        deadline = time.monotonic() + timeout
        for worker in running:
            worker.thread.join(max(0.1, deadline - time.monotonic()))
        if self._thread is not None:
            self._thread.join(max(0.1, deadline - time.monotonic()))

    # -- the scheduler ------------------------------------------------------------------------

    def refresh(self, max_age_s: float = 0.0) -> None:
        """Read the table again: new jobs (another server's), ends, forgotten jobs."""
        if time.monotonic() - self._refreshed < max_age_s:
            return
        self._refreshed = time.monotonic()
        with self._lock:
            known = dict(self._records)
        names = self.table.names()
        for name in names:
            record = known.get(name)
            if (record is None or not record.finished) and (
                fresh := self.table.load(name)
            ) is not None:
                self._remember(fresh)
        with self._lock:  # (only what was known before the listing: not a job just queued)
            for name in set(known) - set(names) - set(self._running):
                self._records.pop(name, None)

    def _remember(self, record: JobRecord) -> None:
        with self._lock:
            if record.name not in self._running:  # (a running job's record is its worker's)
                self._records[record.name] = record

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
        """Pass on cancel requests; renew leases; save running jobs' progress."""
        with self._lock:
            running = list(self._running.values())
        now = time.monotonic()
        for worker in running:
            name = worker.record.name
            if not worker.canceled and self.table.cancel_requested(name):
                worker.cancel()
            if now - worker.renewed >= RENEW_EVERY_S:
                try:
                    held = self.table.renew(name)
                except StorageError as exc:
                    log.warning("job %s: cannot renew its lease: %s", name, exc.message)
                    held = now - worker.renewed < t.LEASE_S / 2  # (stop well before it expires)
                if held:
                    worker.renewed = now
                else:
                    log.warning("job %s: its lease is lost; stopping it here", name)
                    worker.lost = True
                    worker.stop.set()
            if now - worker.saved >= SAVE_EVERY_S and not worker.lost:
                with self._lock:
                    if worker.record.finished:
                        continue
                    worker.counts()
                    self.table.save(worker.record)
                worker.saved = now

    def _start_next(self) -> None:
        with self._lock:
            queued = sorted(
                (
                    r
                    for r in self._records.values()
                    if not r.finished and r.name not in self._running
                ),
                key=lambda r: r.created,
            )
        for record in queued:
            with self._claim:
                if not self._start(record):
                    return

    def _start(self, record: JobRecord) -> bool:
        """Start ``record``'s job if this server may (False: no room for more now)."""
        name, output_lease = record.name, _output_lease(record.output)
        with self._lock:
            if self._stopping or len(self._running) >= self.config.max_running_jobs:
                return False
        if not self.table.take(name):
            return True  # another server runs it
        started = False
        try:
            fresh = self.table.load(name)
            if fresh is None or fresh.finished:
                return True
            if self.table.cancel_requested(name) or fresh.status == t.CANCEL_REQUESTED:
                end(fresh, t.CANCELED)  # (canceled while nobody ran it)
                self._save(fresh)
                self.table.clear_cancel(name)
                return True
            if not self.table.take(output_lease):
                return True  # another job writes its output now: it waits its turn
            assert self._run_job is not None
            fresh.server = self.table.server_id
            worker = JobWorker(
                fresh,
                lambda r: job_options(self.settings, r, self.resolver.guard),
                self._run_job,
                self.config.job_retries,
                self._save,
                self._finished,
            )
            with self._lock:
                if self._stopping:  # (stop() joins every thread it finds here: start none)
                    self.table.release(output_lease)
                    return False
                self._running[name] = worker
                self._records[name] = fresh
                worker.thread.start()
                started = True
            return True
        finally:
            if not started:
                self.table.release(name)

    def _finished(self, worker: JobWorker) -> None:
        """A worker has ended: its last record, then its leases go."""
        record = worker.record
        with self._lock:
            self._running.pop(record.name, None)
        try:
            if not worker.lost:
                self._save(record)
                if record.finished:
                    self.table.clear_cancel(record.name)
        finally:
            self.table.release(_output_lease(record.output))
            self.table.release(record.name)
            with self._lock:
                self._wake.notify_all()

    def _save(self, record: JobRecord) -> None:
        with self._lock:
            self.table.save(record)
            self._records[record.name] = record

    def _forget_old(self) -> None:
        ended = sorted((r for r in self._records.values() if r.finished), key=lambda r: r.created)
        for old in ended[: max(0, len(ended) - self.config.jobs_kept)]:
            self.table.forget(old.name)
            del self._records[old.name]


def _output_lease(output: str) -> str:
    return "output-" + hashlib.sha256(output.encode()).hexdigest()[:32]


def _safe_name(name: str) -> bool:
    return 0 < len(name) <= 100 and all(c.isalnum() or c in "-_." for c in name) and name[0] != "."


__all__ = ["JobHost", "RunJob"]
