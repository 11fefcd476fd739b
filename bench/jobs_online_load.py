"""bench/jobs_online.py's online load, an open loop of ``POST /score`` requests, and what
the server reports between two moments (``/metrics``' histograms, CPU seconds)."""

from __future__ import annotations

import asyncio
import math
import os
import random
import re
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from server_load import JSON_HEADERS, check_answer

from testkit.live_server import RunningServer


@dataclass
class Sample:
    due: float  # perf_counter when it was due; its latency counts from here
    lag: float  # how late this client sent it
    end: float
    error: str | None


class OpenLoop:
    """One-image ``POST /score`` requests at ``rate`` a second whatever the answers: one
    every ``1 / rate`` s, or (``poisson``) at random, exponential gaps of that mean (seed
    0: the same arrivals every run)."""

    def __init__(
        self, url: str, bodies: list[bytes], rate: float, timeout: float, poisson: bool = False
    ) -> None:
        self.url, self.bodies, self.interval, self.timeout = url, bodies, 1 / rate, timeout
        self.gaps = random.Random(0) if poisson else None
        self.samples: list[Sample] = []
        self.in_flight: set[float] = set()  # when each request not answered yet was due
        self.stopping = False

    async def drain(self, due_before: float, timeout: float) -> float:
        """Wait until every request due before ``due_before`` is answered; seconds waited."""
        start = time.perf_counter()
        while min(self.in_flight, default=due_before) < due_before:
            if time.perf_counter() - start > timeout:
                raise RuntimeError(f"requests still unanswered after {timeout:.0f} s")
            await asyncio.sleep(0.05)
        return time.perf_counter() - start

    async def run(self) -> None:
        limits = httpx.Limits(max_connections=1024, max_keepalive_connections=64)
        async with httpx.AsyncClient(timeout=self.timeout, limits=limits) as http:
            tasks: set[asyncio.Task[None]] = set()
            due, k = time.perf_counter(), 0
            while not self.stopping:
                due += self.gaps.expovariate(1 / self.interval) if self.gaps else self.interval
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
                task = asyncio.create_task(self._send(http, self.bodies[k % len(self.bodies)], due))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                k += 1
            await asyncio.gather(*tasks)  # the requests in flight finish

    async def _send(self, http: httpx.AsyncClient, body: bytes, due: float) -> None:
        sent = time.perf_counter()
        self.in_flight.add(due)
        try:
            response = await http.post(f"{self.url}/score", content=body, headers=JSON_HEADERS)
            error = check_answer(response)
        except Exception as exc:  # any failure is a failed request, never a hang
            error = f"{type(exc).__name__}: {exc}"
        self.samples.append(Sample(due, sent - due, time.perf_counter(), error))
        self.in_flight.discard(due)


@dataclass(frozen=True)
class Counters:
    """Cumulative counts at one moment: /metrics' histograms (NAME_sum, NAME_count) and
    CPU seconds used by the server process, by this script and by the whole machine."""

    histograms: dict[str, float]
    server_cpu_s: float
    bench_cpu_s: float
    machine_cpu_s: float


def process_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def machine_cpu_s() -> float:
    """CPU seconds all processes have used (not idle, not waiting for I/O), from /proc/stat."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


async def counters(api: httpx.AsyncClient, server: RunningServer) -> Counters:
    text = (await api.get(f"{server.url}/metrics")).text
    found = re.findall(r"^blipserve_(\w+?_(?:sum|count)) (\S+)$", text, re.M)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return Counters(
        {name: float(value) for name, value in found},
        process_cpu_s(server.proc.pid),
        usage.ru_utime + usage.ru_stime,
        machine_cpu_s(),
    )


def per_call(before: Counters, after: Counters, name: str) -> float:
    """The mean of histogram ``name`` between two counts (NaN where nothing was observed)."""
    calls = after.histograms[f"{name}_count"] - before.histograms[f"{name}_count"]
    total = after.histograms[f"{name}_sum"] - before.histograms[f"{name}_sum"]
    return total / calls if calls else math.nan
