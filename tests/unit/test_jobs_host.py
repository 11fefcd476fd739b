"""The job host without a model: a stand-in runs each job, so the tests hold jobs where they
want them.  What is checked before a job is queued, the order jobs run in, cancel, a
restart, two servers on one jobs folder, retries after a storage error."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from blipserve.batch.options import BatchOptions, Summary
from blipserve.batch.storage import StorageError
from blipserve.config import FailureLimit, Settings
from blipserve.contracts.batch_jobs import JobSpec
from blipserve.errors import Conflict, Forbidden, InvalidInput, JobNotFound, TooManyJobs
from blipserve.jobs import worker as worker_module
from blipserve.jobs.host import JobHost
from blipserve.jobs.table import JobTable


class StandIn:
    """Runs jobs: each waits for :meth:`finish` (or its stop) and records what it was given."""

    def __init__(self) -> None:
        self.started: list[BatchOptions] = []
        self.go = threading.Event()
        self.fail_with: list[Exception] = []
        self._seen = threading.Condition()

    def __call__(
        self, options: BatchOptions, stop: threading.Event, running: Callable[[Any], None]
    ) -> Summary:
        running(None)
        with self._seen:
            self.started.append(options)
            self._seen.notify_all()
        if self.fail_with:
            raise self.fail_with.pop(0)
        while not self.go.wait(0.02):
            if stop.is_set():
                from blipserve.errors import JobStopped

                raise JobStopped("stopped")
        return Summary(done=3, failed=1, elapsed_s=1.0)

    def wait_started(self, count: int) -> None:
        with self._seen:
            assert self._seen.wait_for(lambda: len(self.started) >= count, timeout=10)


@pytest.fixture
def folders(tmp_path: Path) -> dict[str, Path]:
    data = tmp_path / "data"
    (data / "in").mkdir(parents=True)
    (data / "in" / "a.jpg").write_bytes(b"not read by the stand-in")
    (data / "in" / "old.csv").write_text("id,text\n")  # (someone's results)
    (data / "in2").mkdir()
    return {"data": data, "jobs": tmp_path / "jobs", "outside": tmp_path}


def settings(
    folders: dict[str, Path], batch: dict[str, Any] | None = None, **jobs: Any
) -> Settings:
    values = {"jobs_dir": str(folders["jobs"]), "jobs_allow_root": (str(folders["data"]),)}
    return Settings.build({}, jobs=values | jobs, batch=batch or {})


@pytest.fixture
def hosts() -> Iterator[list[JobHost]]:
    made: list[JobHost] = []
    yield made
    for host in made:
        host.stop(timeout=5)


def new_host(
    hosts: list[JobHost],
    folders: dict[str, Path],
    run: StandIn,
    batch: dict[str, Any] | None = None,
    **jobs: Any,
) -> JobHost:
    host = JobHost(settings(folders, batch, **jobs))
    host.start(run)
    hosts.append(host)
    return host


def spec(folders: dict[str, Path], out: str = "out", folder: str = "in") -> JobSpec:
    data = folders["data"]
    return JobSpec(str(data / folder), "UriFolder", str(data / out), "UriFolder")


def wait_status(host: JobHost, name: str, status: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while host.get(name).status != status:
        assert time.monotonic() < deadline, f"{name}: {host.get(name).status}, not {status}"
        time.sleep(0.02)


def test_checked_before_it_is_queued(folders: dict[str, Path], hosts: list[JobHost]) -> None:
    host = new_host(hosts, folders, StandIn())
    data = folders["data"]
    cases: list[tuple[JobSpec, type[Exception], str]] = [
        (JobSpec(str(folders["outside"]), "UriFolder"), Forbidden, "--jobs-allow-root"),
        (JobSpec(str(data / "nope"), "UriFolder"), InvalidInput, "does not exist"),
        (JobSpec(str(data / "in" / "a.jpg"), "UriFolder"), InvalidInput, "use UriFile"),
        (JobSpec(str(data / "in"), "UriFile"), InvalidInput, "use UriFolder"),
        (
            JobSpec(str(data / "in"), "UriFolder", str(data / "out.xml"), "UriFile"),
            InvalidInput,
            "cannot tell the format",
        ),
        (
            JobSpec(str(data / "in"), "UriFolder", str(data / "in" / "old.csv"), "UriFile"),
            Conflict,
            "exists already",
        ),
        (
            JobSpec(str(data / "in"), "UriFolder", str(data / "in" / "a.jpg" / "o"), "UriFolder"),
            InvalidInput,
            "is a file, not a folder",
        ),
        # no OutputData, and the default output root is not under an allowed root
        (JobSpec(str(data / "in"), "UriFolder"), Forbidden, "give OutputData"),
    ]
    for bad, kind, says in cases:
        with pytest.raises(kind) as caught:
            host.submit(bad)
        assert says in caught.value.args[0], caught.value.args[0]
        assert caught.value.args[0].startswith("properties."), caught.value.args[0]
    assert host.jobs() == []


def test_jobs_run_in_order_one_at_a_time(folders: dict[str, Path], hosts: list[JobHost]) -> None:
    run = StandIn()
    host = new_host(hosts, folders, run)
    first = host.submit(spec(folders, "o1"))
    second = host.submit(spec(folders, "o2", "in2"))
    with pytest.raises(Conflict, match=r"writes .* already"):
        host.submit(spec(folders, "o2"))  # (another job writes that output)
    run.wait_started(1)
    time.sleep(0.3)
    assert len(run.started) == 1
    assert host.get(second.name).status == "Queued"
    assert host.get(first.name).status == "Running"
    run.go.set()
    wait_status(host, second.name, "Completed")
    assert [str(o.input) for o in run.started] == [first.input, second.input]
    done = host.get(first.name)
    assert (done.status, done.done, done.failed, done.attempts) == ("Completed", 3, 1, 1)
    assert done.total == 4
    assert done.started is not None
    assert done.ended is not None
    assert [r.name for r in host.jobs()] == [second.name, first.name]  # newest first


def test_cancel(folders: dict[str, Path], hosts: list[JobHost]) -> None:
    run = StandIn()
    host = new_host(hosts, folders, run)
    running = host.submit(spec(folders, "o1"))
    queued = host.submit(spec(folders, "o2", "in2"))
    run.wait_started(1)
    assert host.cancel(queued.name).status == "Canceled"
    assert host.cancel(running.name).status == "CancelRequested"
    wait_status(host, running.name, "Canceled")
    with pytest.raises(Conflict, match="has ended"):
        host.cancel(running.name)
    with pytest.raises(JobNotFound):
        host.get("batchjob-nope")
    with pytest.raises(JobNotFound):
        host.get("../../etc/passwd")
    assert len(run.started) == 1


def test_a_restarted_server_resumes_running_and_queued_jobs(
    folders: dict[str, Path], hosts: list[JobHost]
) -> None:
    run = StandIn()
    host = new_host(hosts, folders, run)
    running = host.submit(spec(folders, "o1"))
    queued = host.submit(spec(folders, "o2", "in2"))
    run.wait_started(1)
    host.stop(timeout=5)  # (as a server stops: the running job goes back to the queue)
    assert host.table.load(running.name).status == "Queued"  # type: ignore[union-attr]
    again = StandIn()
    again.go.set()
    successor = new_host(hosts, folders, again)
    wait_status(successor, queued.name, "Completed")
    assert [str(o.input) for o in again.started] == [running.input, queued.input]
    assert successor.get(running.name).attempts == 2


def test_two_servers_never_run_one_job(folders: dict[str, Path], hosts: list[JobHost]) -> None:
    one, two = StandIn(), StandIn()
    first = new_host(hosts, folders, one)
    new_host(hosts, folders, two, max_running_jobs=2)
    jobs = [first.submit(spec(folders, f"o{i}", "in" if i % 2 else "in2")) for i in range(4)]
    time.sleep(2.5)  # (each server looks at the table every second or two)
    one.go.set()
    two.go.set()
    for job in jobs:
        wait_status(first, job.name, "Completed", timeout=20)
    ran = [str(o.output) for o in one.started + two.started]
    assert sorted(ran) == sorted(j.output for j in jobs)  # each once, on one server or the other
    assert two.started, "the second server took none of the jobs"


def test_a_storage_error_is_retried_then_fails(
    folders: dict[str, Path], hosts: list[JobHost], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(worker_module, "RETRY_WAIT_S", 0.01)
    run = StandIn()
    run.go.set()
    run.fail_with = [StorageError("cannot read az://x: ServiceUnavailable")]
    host = new_host(hosts, folders, run, job_retries=1)
    ok = host.submit(spec(folders, "o1"))
    wait_status(host, ok.name, "Completed")
    assert host.get(ok.name).attempts == 2
    run.fail_with = [StorageError("cannot read az://x: gone")] * 2
    failed = host.submit(spec(folders, "o2"))
    wait_status(host, failed.name, "Failed")
    error = host.get(failed.name).error
    assert error == {"code": "StorageError", "message": "cannot read az://x: gone"}


def test_bounded(folders: dict[str, Path], hosts: list[JobHost]) -> None:
    run = StandIn()
    host = new_host(hosts, folders, run, max_waiting_jobs=2, jobs_kept=1)
    first = host.submit(spec(folders, "o1"))
    host.submit(spec(folders, "o2"))
    with pytest.raises(TooManyJobs):
        host.submit(spec(folders, "o3"))
    run.go.set()
    wait_status(host, first.name, "Completed")
    time.sleep(0.5)
    third = host.submit(spec(folders, "o3"))
    wait_status(host, third.name, "Completed")
    fourth = host.submit(spec(folders, "o4"))
    # The two oldest forgotten when o4 came (o4 itself may have finished since: a stand-in
    # job ends at once, and finished jobs are forgotten as new ones come)
    assert {r.name for r in host.jobs()} == {third.name, fourth.name}
    assert len(JobTable(host.table.folder).names()) == 2  # (forgotten in the folder too)


def test_the_servers_batch_settings_and_the_jobs_own_reach_it(
    folders: dict[str, Path], hosts: list[JobHost]
) -> None:
    run = StandIn()
    run.go.set()
    batch = {"max_failures": FailureLimit.parse("5%"), "chunk_rows": 7}
    host = new_host(hosts, folders, run, batch)
    data = folders["data"]
    mine = {"format": "jsonl", "prompt": "a photo of", "params": {"max_new_tokens": 5}}
    job = host.submit(
        JobSpec(str(data / "in"), "UriFolder", str(data / "o.txt"), "UriFile", overrides=mine)
    )
    wait_status(host, job.name, "Completed")
    [options] = run.started
    assert options.max_failures == FailureLimit(percent=5.0)
    assert (options.chunk_rows, options.format, options.prompt) == (7, "jsonl", "a photo of")
    assert options.params.max_new_tokens == 5
    assert options.guard is not None
    assert options.guard.allowed(str(data / "in" / "a.jpg"))
    assert not options.guard.allowed(str(folders["outside"] / "x.jpg"))


def test_a_cancel_on_one_server_stops_the_job_on_another(
    folders: dict[str, Path], hosts: list[JobHost]
) -> None:
    runs = StandIn()
    runner = new_host(hosts, folders, runs)
    asked = JobHost(settings(folders))  # (a second server that runs nothing: it only answers)
    job = runner.submit(spec(folders, "o1"))
    runs.wait_started(1)
    assert asked.cancel(job.name).status == "CancelRequested"
    wait_status(runner, job.name, "Canceled")
    assert asked.get(job.name).status == "Canceled"


def test_a_queued_job_left_by_a_stopped_server_cancels_at_once(
    folders: dict[str, Path], hosts: list[JobHost]
) -> None:
    run = StandIn()
    host = new_host(hosts, folders, run)
    first = host.submit(spec(folders, "o1"))
    run.wait_started(1)
    host.stop(timeout=5)  # (its job back in the queue, its record naming this server)
    assert host.table.load(first.name).server is not None  # type: ignore[union-attr]
    busy = StandIn()
    successor = new_host(hosts, folders, busy)
    second = successor.submit(spec(folders, "o2", "in2"))  # runs after the first
    busy.wait_started(1)
    canceled = successor.cancel(second.name)
    assert canceled.status == "Canceled"  # nobody ran it: ended at once
    busy.go.set()
    wait_status(successor, first.name, "Completed")
    assert [str(o.output) for o in busy.started] == [first.output]


def test_two_jobs_never_write_one_output_at_once(
    folders: dict[str, Path], hosts: list[JobHost]
) -> None:
    one, two = StandIn(), StandIn()
    first, second = new_host(hosts, folders, one), new_host(hosts, folders, two)
    a = first.submit(spec(folders, "same"))
    one.wait_started(1)
    b = second.submit(spec(folders, "same", "in2"))  # (the first server's job is not its)
    time.sleep(3)
    assert two.started == []  # the output's lease is held: it waits
    one.go.set()
    two.go.set()
    wait_status(second, b.name, "Completed", timeout=20)
    assert first.get(a.name).status == "Completed"


def test_restarts_do_not_use_up_the_retries(
    folders: dict[str, Path], hosts: list[JobHost], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(worker_module, "RETRY_WAIT_S", 0.01)
    run = StandIn()
    host = new_host(hosts, folders, run, job_retries=1)
    job = host.submit(spec(folders, "o1"))
    run.wait_started(1)
    host.stop(timeout=5)
    again = StandIn()
    again.fail_with = [StorageError("cannot read az://x: for a moment")]
    again.go.set()
    successor = new_host(hosts, folders, again, job_retries=1)
    wait_status(successor, job.name, "Completed")
    assert successor.get(job.name).attempts == 3  # (shown: every start)


def test_a_job_takes_only_the_servers_settings_meant_for_every_job(
    folders: dict[str, Path],
) -> None:
    from blipserve.jobs.table import JobRecord
    from blipserve.jobs.uris import AllowedRoots
    from blipserve.jobs.worker import job_options

    batch = {"sidecar": ".txt", "filter_model": "x/y", "overwrite": True, "chunk_rows": 5}
    server = settings(folders, batch)
    record = JobRecord("batchjob-x", spec(folders), "/in", "/out.jsonl")
    options = job_options(server, record, AllowedRoots((str(folders["data"]),)))
    assert (options.sidecar, options.filter_model, options.overwrite) == (None, None, False)
    assert options.chunk_rows == 5


def test_the_job_log_level_sets_the_jobs_loggers(
    folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import logging

    for name in ("blipserve.batch", "blipserve.jobs"):  # (restored after the test)
        monkeypatch.setattr(logging.getLogger(name), "level", logging.getLogger(name).level)
    JobHost(settings(folders, job_log_level="warning"))
    for name in ("blipserve.batch", "blipserve.jobs"):
        assert logging.getLogger(name).level == logging.WARNING
