"""The job table: one JSON record a job in the jobs folder (``--jobs-dir``, a local path or
an object-store URL), so jobs outlive the server that took them.

``DIR/jobs/NAME.json`` is the record (replaced whole, atomically, at each change);
``DIR/leases/NAME`` says which server runs the job (``DIR/leases/output-HASH``, which job
writes an output); ``DIR/cancels/NAME`` asks the server running a job to cancel it.
On a local (or NFS) folder the lease
is an OS lock (``flock``) the running server holds: a killed server's lock is gone with it,
and no two servers ever hold one.  In an object store it is an object naming its holder
and an expiry, renewed while the job runs: a killed server's lease expires
(``LEASE_S``), then another server takes the job over.  A store has no lock, so the
taking is put, wait, read back: two servers both see themselves holding it only if one
of them took more than ``SETTLE_S`` between reading the lease and writing its own.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import IO, Any

from blipserve.batch.storage import Location, StorageError
from blipserve.contracts.batch_jobs import JobSpec

log = logging.getLogger(__name__)

#: the catalog's job statuses that blipserve's jobs go through
QUEUED, STARTING, RUNNING = "Queued", "Starting", "Running"
CANCEL_REQUESTED, COMPLETED, FAILED, CANCELED = (
    "CancelRequested",
    "Completed",
    "Failed",
    "Canceled",
)
FINISHED = frozenset({COMPLETED, FAILED, CANCELED})
STATUSES = (QUEUED, STARTING, RUNNING, CANCEL_REQUESTED, COMPLETED, FAILED, CANCELED)
LEASE_S = 30.0  # a store lease's life; renewed every LEASE_S / 3 while the job runs
SETTLE_S = 1.0


def new_job_name() -> str:
    """A job's name (and id), as the catalog names its batch jobs."""
    return f"batchjob-{uuid.uuid4()}"


@dataclass
class JobRecord:
    """A job as the table keeps it.  ``input`` and ``output`` are the resolved URLs (never
    credentials); ``output_file`` is where results go (``None``: summary_only)."""

    name: str
    spec: JobSpec
    input: str
    output: str
    created: float = field(default_factory=time.time)
    status: str = QUEUED
    started: float | None = None
    ended: float | None = None
    done: int = 0
    failed: int = 0
    skipped: int = 0
    total: int | None = None
    rows_per_s: float = 0.0
    attempts: int = 0
    error: dict[str, str] | None = None
    server: str | None = None  # the server running it, last it said
    summary_only: bool = False  # (output_action: results in the jobs folder, not shown)
    updated: float = field(default_factory=time.time)

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    def to_json(self) -> dict[str, Any]:
        raw = asdict(self)
        raw["spec"] = self.spec.to_json()
        return raw

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> JobRecord:
        values = dict(raw)
        values["spec"] = JobSpec.from_json(raw["spec"])
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in values.items() if k in known})


class JobTable:
    """The records and leases of a jobs folder."""

    def __init__(self, folder: Location, server_id: str | None = None) -> None:
        self.folder = folder
        self.server_id = server_id or f"{os.uname().nodename}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._records = folder.child("jobs")
        self._leases = folder.child("leases")
        self._cancels = folder.child("cancels")
        for where in (self._records, self._leases, self._cancels):
            where.mkdirs()
        self._locks: dict[str, IO[bytes]] = {}  # local leases held: name -> open lock file

    # -- records ------------------------------------------------------------------------------

    def save(self, record: JobRecord) -> None:
        record.updated = time.time()
        body = json.dumps(record.to_json(), indent=1).encode()
        self._records.child(f"{record.name}.json").write_bytes(body)

    def load(self, name: str) -> JobRecord | None:
        try:
            raw = self._records.child(f"{name}.json").read_bytes()
        except FileNotFoundError:
            return None
        try:
            return JobRecord.from_json(json.loads(raw))
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("job record %s is unreadable (%s); ignored", name, exc)
            return None

    def names(self) -> list[str]:
        try:
            entries = self._records.listing()
        except FileNotFoundError:
            return []
        names = (str(e["name"]).rstrip("/").rsplit("/", 1)[-1] for e in entries)
        return [n[: -len(".json")] for n in names if n.endswith(".json") and n[0] != "."]

    def forget(self, name: str) -> None:
        self.folder.child("work").child(name).remove(recursive=True)  # (summary_only's)
        self._records.child(f"{name}.json").remove()
        self._leases.child(name).remove()
        self.clear_cancel(name)

    # -- cancel requests (a marker the server running the job reads) -------------------------

    def request_cancel(self, name: str) -> None:
        self._cancels.child(name).write_bytes(b"")

    def cancel_requested(self, name: str) -> bool:
        return self._cancels.child(name).exists()

    def clear_cancel(self, name: str) -> None:
        self._cancels.child(name).remove()

    # -- leases -------------------------------------------------------------------------------

    def take(self, name: str) -> bool:
        """Take the job's lease (True), or find another server holding it (False)."""
        where = self._leases.child(name)
        if where.local:
            return self._lock(name, where)
        held = self._read_lease(where)
        if held and held["server"] != self.server_id and held["expires"] > time.time():
            return False
        self._write_lease(where)
        time.sleep(SETTLE_S)
        mine = self._read_lease(where)
        return mine is not None and mine["server"] == self.server_id

    def renew(self, name: str) -> bool:
        """Keep holding the lease; False once another server holds it (stop the job)."""
        where = self._leases.child(name)
        if where.local:
            return name in self._locks
        held = self._read_lease(where)
        if held and held["server"] != self.server_id:
            return False
        self._write_lease(where)
        return True

    def release(self, name: str) -> None:
        lock = self._locks.pop(name, None)
        if lock is not None:
            lock.close()  # (the lock goes with the file; the empty file stays)
            return
        where = self._leases.child(name)
        if not where.local:
            with contextlib.suppress(StorageError):
                held = self._read_lease(where)
                if held and held["server"] == self.server_id:
                    where.remove()

    def _lock(self, name: str, where: Location) -> bool:
        import fcntl

        if name in self._locks:
            return True
        handle = open(where.path, "ab")  # noqa: SIM115 (held open while the job runs)
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            return False
        self._locks[name] = handle
        return True

    def _read_lease(self, where: Location) -> dict[str, Any] | None:
        try:
            raw = json.loads(where.read_bytes())
        except FileNotFoundError:
            return None
        except ValueError:
            return None  # (a torn or foreign object: nobody's)
        return raw if isinstance(raw, dict) and {"server", "expires"} <= set(raw) else None

    def _write_lease(self, where: Location) -> None:
        body = {"server": self.server_id, "expires": time.time() + LEASE_S}
        where.write_bytes(json.dumps(body).encode())


__all__ = [
    "CANCELED",
    "CANCEL_REQUESTED",
    "COMPLETED",
    "FAILED",
    "FINISHED",
    "QUEUED",
    "RUNNING",
    "STARTING",
    "STATUSES",
    "JobRecord",
    "JobTable",
    "new_job_name",
]
