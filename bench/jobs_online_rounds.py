"""bench/jobs_online.py's rounds: a window of the load alone, then one with a batch job
running on the server (``/jobs``), each measured as a :class:`Window`."""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from jobs_online_load import Counters, OpenLoop, counters

from testkit.live_server import RunningServer

NO_JOB, JOB = "no job", "job"
ENDED = ("Completed", "Failed", "Canceled")


@dataclass(frozen=True)
class JobPoll:
    at: float
    status: str
    done: int
    failed: int
    server_rows_per_s: float  # the server's own figure: rows / time since the job started


class JobsApi:
    """``/jobs`` on the server under test; any answer but the expected one raises."""

    def __init__(self, http: httpx.AsyncClient, url: str) -> None:
        self.http, self.url = http, url

    async def call(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        response = await self.http.request(method, f"{self.url}{path}", json=body)
        if response.status_code not in (200, 202):
            raise RuntimeError(f"{method} {path}: HTTP {response.status_code}: {response.text}")
        answer: dict[str, Any] = response.json()
        return answer

    async def start(self, folder: Path, output: Path, params: dict[str, int]) -> str:
        props = {
            "InputData": {"in": {"JobInputType": "UriFolder", "Uri": str(folder)}},
            "OutputData": {"out": {"JobOutputType": "UriFolder", "Uri": str(output)}},
            "blipserve": {"params": params},
        }
        name: str = (await self.call("POST", "/jobs", {"properties": props}))["name"]
        return name

    async def poll(self, name: str) -> tuple[JobPoll, dict[str, Any]]:
        props = (await self.call("GET", f"/jobs/{name}"))["properties"]
        p = props["progress"]
        return JobPoll(
            time.perf_counter(), props["status"], p["rowsDone"], p["rowsFailed"], p["rowsPerSecond"]
        ), props

    async def wait(self, name: str, statuses: tuple[str, ...], timeout: float) -> dict[str, Any]:
        deadline = time.perf_counter() + timeout
        while True:
            poll, props = await self.poll(name)
            if poll.status in statuses or poll.status in ENDED:
                return props
            if time.perf_counter() > deadline:
                raise RuntimeError(f"job {name}: still {poll.status} after {timeout:.0f} s")
            await asyncio.sleep(0.25)


@dataclass
class Window:
    condition: str
    round: int
    start: float
    end: float
    before: Counters
    after: Counters
    job: str | None = None
    polls: list[JobPoll] = field(default_factory=list)
    job_final: dict[str, Any] | None = None  # the job's status and error once it ended
    drain_s: float | None = None  # from the job's end until the requests due were answered


async def measure_window(
    api: JobsApi,
    server: RunningServer,
    condition: str,
    i: int,
    args: argparse.Namespace,
    job: str | None = None,
) -> Window:
    polls: list[JobPoll] = []

    async def poll() -> None:
        if job is None:
            (await api.http.get(f"{server.url}/ready")).raise_for_status()
        else:
            polls.append((await api.poll(job))[0])

    before = await counters(api.http, server)
    start = time.perf_counter()
    await poll()
    while (left := start + args.duration - time.perf_counter()) > 0:
        await asyncio.sleep(min(args.poll, left))
        await poll()
    end = time.perf_counter()
    return Window(condition, i, start, end, before, await counters(api.http, server), job, polls)


async def one_round(
    api: JobsApi,
    server: RunningServer,
    load: OpenLoop,
    i: int,
    data: Path,
    args: argparse.Namespace,
) -> list[Window]:
    """A window without a job, then one with a new job (canceled at its end); the next
    round starts once the requests due by the job's end are answered, and ``--settle`` s."""
    no_job = await measure_window(api, server, NO_JOB, i, args)
    params = {"max_new_tokens": args.tokens, "min_new_tokens": args.tokens}
    name = await api.start(data / "input", data / "out" / f"round-{i}", params)
    props = await api.wait(name, ("Running",), args.start_timeout)
    if props["status"] != "Running":
        raise RuntimeError(f"job {name} {props['status']} before it ran: {props['error']}")
    await asyncio.sleep(args.settle)
    with_job = await measure_window(api, server, JOB, i, args, job=name)
    cancel = await api.http.post(f"{server.url}/jobs/{name}/cancel")
    if cancel.status_code not in (200, 409):  # (409: it had ended)
        raise RuntimeError(f"cancel {name}: HTTP {cancel.status_code}: {cancel.text}")
    final = await api.wait(name, ENDED, args.start_timeout)
    with_job.job_final = {"status": final["status"], "error": final["error"]}
    with_job.drain_s = await load.drain(time.perf_counter(), args.timeout)
    await asyncio.sleep(args.settle)
    return [no_job, with_job]
