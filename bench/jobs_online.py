"""Benchmark `/score` latency at a steady online load, with and without a batch job running
on the same server (``POST /jobs``, issue 32), side by side in one run.

What it measures: one ``blipserve serve --jobs-dir DIR --jobs-allow-root ROOT`` process,
started once, takes an open-loop load for the whole run: one-image ``POST /score`` requests
sent at fixed intervals whatever the answers (a slow answer does not delay the next request,
so queueing shows in the latency, which counts from when a request was due), each of
exactly ``--tokens`` new tokens (bench/server.py's bodies: scikit-image photos at 640x480,
JPEG, base64).  The rate is ``--busy`` (0.45) / the median latency of one request alone,
measured first, so the server is ~45% busy without a job (the latency includes HTTP and
decoding, so the model itself is a little less busy; ``requests_model_busy`` in the report
is the share measured from ``/metrics``), unless ``--rate`` is given.

Windows of ``--duration`` seconds (30) then alternate, ``--repeats`` rounds (5) of:

* ``no job``: the load alone;
* ``job``: the load while a batch job captions a folder of the same photos (640x480 JPEG
  files, hard links to them, enough that the job outlasts the window) with the same
  generation settings.  A new job (new output folder) is started before each such window;
  the window opens ``--settle`` s (5) after the job reports ``Running``, and the job is
  canceled when it closes.  The next round starts once every request due by the job's end
  is answered (``backlog_drain_s``), and ``--settle`` s more.

Per window: p50/p90/p99 latency of the requests due in it, requests answered, errors (any
answer but a 200 with one caption; all are reported), the requests' share of the model's
time and mean batch and queue wait (from ``/metrics``), the CPU cores used by the server,
by this script and by every other process (``other_cpu_cores``: a shared machine's noise),
and the job's rows/s from its ``rowsDone + rowsFailed`` over the window (polled every
``--poll`` s in both conditions: ``GET /jobs/NAME``, or ``GET /ready`` without a job).  A
job's counts move a chunk at a time (``--chunk-rows`` rows journaled together; the
server's default, 64, is minutes of work at a throttled job's pace on a CPU), so the server
runs with ``--chunk-rows 4`` here unless told otherwise (while requests come, a job's model
calls are of one row anyway).  Ratios job / no job are given per round and of the medians;
percentiles pooled over all rounds too (one 30 s window holds ~30 requests: its p99 is
about its maximum).

Target (issue 32): p50 with a job running within 1.3x of the p50 without, while the job
still makes progress (rows done in every job window).

    .venv/bin/python bench/jobs_online.py                    # BLIP-base, ~8 min on 2 cores
    .venv/bin/python bench/jobs_online.py --quick --out /tmp/q.json   # tiny model, ~1.5 min

Machine caveats: on 2 cores, the job's image reading and decoding (its own threads,
``--chunk-rows`` images decoded ahead of its model calls) compete with the model and with
the requests' decoding for the same cores; the model's share that ``--jobs-share`` bounds
is not the whole cost of a job.  torch runs the model on both cores, so a core taken by
anything else (another process, the job's decoding) slows every model call, more than its
share of CPU time suggests.  This script's own load generator and polls take a little CPU
too (``bench_cpu_cores``).  Run it on a quiet machine; the background load is measured
before the server starts and a warning is printed when it is high.  Results go to
``bench/results/jobs-online-cpu.json`` (``--out`` to change; ``--quick`` writes only to
``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as dt
import json
import math
import os
import random
import re
import resource
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # bench/ is not a package: found through sys.path
    ROOT,
    RunningServer,
    build_random_model,
    count_parameters,
    machine_info,
    percentile,
    python_command,
    sample_images,
    start_server,
)
from server import (
    BACKGROUND_WARN,
    CACHE,
    JSON_HEADERS,
    QUICK_OVERRIDES,
    background_cpu_busy,
    check_answer,
    log,
    ratio,
    score_body,
    server_dtype,
)

DEFAULT_OUT = ROOT / "bench" / "results" / "jobs-online-cpu.json"
NO_JOB, JOB = "no job", "job"
ENDED = ("Completed", "Failed", "Canceled")
TARGET_P50_RATIO = 1.3


# -- the online load -----------------------------------------------------------------------


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


# -- what the server reports ---------------------------------------------------------------


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


# -- windows and rounds --------------------------------------------------------------------


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


@dataclass
class JobStats:
    """A job over one window, from its polls (``rowsDone`` moves a chunk at a time)."""

    name: str
    rows: int  # rows done or failed in the window
    rows_failed: int
    rows_per_s: float
    commits: int  # times the counts moved in the window
    status_at_end: str
    server_rows_per_s: float  # the server's figure at the end: since the job started
    final: dict[str, Any] | None  # status and error once it ended
    backlog_drain_s: float | None  # from its end until the requests due then were answered


@dataclass
class WindowResult:
    condition: str
    round: int
    window_s: float
    sent: int
    answered: int
    errors: int
    error_examples: list[str]
    p50_s: float
    p90_s: float
    p99_s: float
    max_send_lag_s: float  # how late this script sent a request (should be ~0)
    requests_model_busy: float  # model time of requests' batches ended in it / window
    mean_batch: float
    mean_queue_wait_s: float
    server_cpu_cores: float
    bench_cpu_cores: float
    other_cpu_cores: float  # every other process on the machine (a shared machine's noise)
    job: JobStats | None


def latencies(w: Window, samples: list[Sample]) -> tuple[list[Sample], list[float]]:
    mine = [s for s in samples if w.start <= s.due < w.end]
    return mine, [s.end - s.due for s in mine if s.error is None]


def job_stats(w: Window) -> JobStats | None:
    if w.job is None or not w.polls:
        return None
    first, last = w.polls[0], w.polls[-1]
    rows = last.done + last.failed - first.done - first.failed
    return JobStats(
        w.job,
        rows,
        last.failed - first.failed,
        rows / (last.at - first.at),
        len({p.done + p.failed for p in w.polls}) - 1,
        last.status,
        last.server_rows_per_s,
        w.job_final,
        w.drain_s,
    )


def result_of(w: Window, samples: list[Sample]) -> WindowResult:
    mine, ok = latencies(w, samples)
    errors = [s.error for s in mine if s.error is not None]
    seconds = w.end - w.start
    model_s = w.after.histograms["model_seconds_sum"] - w.before.histograms["model_seconds_sum"]
    return WindowResult(
        condition=w.condition,
        round=w.round,
        window_s=seconds,
        sent=len(mine),
        answered=len(ok),
        errors=len(errors),
        error_examples=sorted(set(errors))[:5],
        p50_s=percentile(ok, 50),
        p90_s=percentile(ok, 90),
        p99_s=percentile(ok, 99),
        max_send_lag_s=max((s.lag for s in mine), default=math.nan),
        requests_model_busy=model_s / seconds,
        mean_batch=per_call(w.before, w.after, "batch_size"),
        mean_queue_wait_s=per_call(w.before, w.after, "queue_wait_seconds"),
        server_cpu_cores=(w.after.server_cpu_s - w.before.server_cpu_s) / seconds,
        bench_cpu_cores=(w.after.bench_cpu_s - w.before.bench_cpu_s) / seconds,
        other_cpu_cores=(
            (w.after.machine_cpu_s - w.before.machine_cpu_s)
            - (w.after.server_cpu_s - w.before.server_cpu_s)
            - (w.after.bench_cpu_s - w.before.bench_cpu_s)
        )
        / seconds,
        job=job_stats(w),
    )


# -- report --------------------------------------------------------------------------------

PERCENTILES = (50, 90, 99)


@dataclass
class ConditionSummary:
    """One condition over all rounds: medians of the rounds' figures, and percentiles of
    every latency pooled."""

    median_s: dict[str, float]  # p50/p90/p99
    pooled_s: dict[str, float]
    answered: int
    errors: int
    median_requests_model_busy: float
    median_server_cpu_cores: float
    median_job_rows_per_s: float | None


def summarize(results: list[WindowResult], pooled: dict[str, list[float]]) -> dict[str, Any]:
    by = {c: [r for r in results if r.condition == c] for c in (NO_JOB, JOB)}
    summary = {}
    for c, rs in by.items():
        rates = [r.job.rows_per_s for r in rs if r.job is not None]
        summary[c] = ConditionSummary(
            {f"p{p}": statistics.median(getattr(r, f"p{p}_s") for r in rs) for p in PERCENTILES},
            {f"p{p}": percentile(pooled[c], p) for p in PERCENTILES},
            sum(r.answered for r in rs),
            sum(r.errors for r in rs),
            statistics.median(r.requests_model_busy for r in rs),
            statistics.median(r.server_cpu_cores for r in rs),
            statistics.median(rates) if rates else None,
        )
    without, with_job = summary[NO_JOB], summary[JOB]
    pairs = list(zip(by[NO_JOB], by[JOB], strict=True))
    ratios = {
        f"p{p} job / no job": {
            "of_medians": ratio(with_job.median_s[f"p{p}"], without.median_s[f"p{p}"]),
            "pooled": ratio(with_job.pooled_s[f"p{p}"], without.pooled_s[f"p{p}"]),
            "per_round": [ratio(getattr(j, f"p{p}_s"), getattr(n, f"p{p}_s")) for n, j in pairs],
        }
        for p in PERCENTILES
    }
    value = ratio(with_job.median_s["p50"], without.median_s["p50"])
    progress = all(r.job is not None and r.job.rows > 0 for r in by[JOB])
    target = {
        "target": f"p50 with a job <= {TARGET_P50_RATIO}x p50 without, the job making progress",
        "p50_ratio_of_medians": value,
        "job_progressed_in_every_window": progress,
        "met": value <= TARGET_P50_RATIO and progress,
    }
    conditions = {c: asdict(v) for c, v in summary.items()}
    return {"conditions": conditions, "ratios": ratios, "target": target}


def markdown(report: dict[str, Any]) -> str:
    m, s = report["machine"], report["summary"]
    lines = [
        "## /score latency with and without a batch job on the server (bench/jobs_online.py)",
        "",
        f"- command: `{report['command']}`",
        f"- date: {report['date']}, total {report['total_s'] / 60:.1f} min",
        f"- machine: {m['cpu']}, {m['usable_cores']} cores, torch {m['torch']}; background "
        f"CPU busy {report['background_cpu_busy']:.0%} before the server started",
        f"- model: {report['model']}, {report['parameters'] / 1e6:.1f}M stored parameters, "
        f"dtype {report['dtype']}",
        f"- load: open loop, {report['rate_per_s']:.3f} requests/s ({report['rate_from']}); "
        f"one request alone: {report['single_latency_s']:.3f} s, model "
        f"{report['single_model_s']:.3f} s",
        f"- job: {report['job_images']} images, {report['tokens']} new tokens a row; "
        f"{report['duration_s']:.0f} s windows, {report['repeats']} rounds; server: "
        f"`{report['server_command']}`",
        "",
        "| round | condition | answered | errors | p50 s | p90 s | p99 s | req. model busy "
        "| server cores | other cores | job rows/s | job rows | backlog drain s |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["windows"]:
        job = r["job"]
        rate, rows, drain = (
            ("-", "-", "-")
            if job is None
            else (f"{job['rows_per_s']:.3f}", job["rows"], f"{job['backlog_drain_s']:.1f}")
        )
        lines.append(
            f"| {r['round'] + 1} | {r['condition']} | {r['answered']} | {r['errors']} | "
            f"{r['p50_s']:.3f} | {r['p90_s']:.3f} | {r['p99_s']:.3f} | "
            f"{r['requests_model_busy']:.0%} | {r['server_cpu_cores']:.2f} | "
            f"{r['other_cpu_cores']:.2f} | {rate} | {rows} | {drain} |"
        )
    lines += [
        "",
        "| condition | p50 s (median; pooled) | p90 s | p99 s | answered | errors | job rows/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for c, v in s["conditions"].items():
        rate = v["median_job_rows_per_s"]
        cells = [f"{v['median_s'][k]:.3f}; {v['pooled_s'][k]:.3f}" for k in ("p50", "p90", "p99")]
        lines.append(
            f"| {c} | {' | '.join(cells)} | {v['answered']} | {v['errors']} | "
            f"{'-' if rate is None else f'{rate:.3f}'} |"
        )
    lines += ["", "| ratio | of medians | pooled | per round |", "|---|---:|---:|---|"]
    for name, r in s["ratios"].items():
        per = ", ".join(f"{v:.2f}x" for v in r["per_round"])
        lines.append(f"| {name} | {r['of_medians']:.2f}x | {r['pooled']:.2f}x | {per} |")
    t = s["target"]
    lines += [
        "",
        f"- target: {t['target']}: {t['p50_ratio_of_medians']:.2f}x, progress in every job "
        f"window: {t['job_progressed_in_every_window']} -> {'met' if t['met'] else 'NOT met'}",
    ]
    for r in report["windows"]:
        if r["errors"]:
            lines.append(
                f"- ERRORS in round {r['round'] + 1} ({r['condition']}): "
                f"{r['errors']}, e.g. {r['error_examples'][0]}"
            )
        if r["job"] and r["job"]["status_at_end"] in ENDED:
            lines.append(
                f"- round {r['round'] + 1}: the job ended inside its window "
                f"({r['job']['status_at_end']}): raise --job-images"
            )
    return "\n".join(lines)


# -- main ----------------------------------------------------------------------------------


def write_job_input(data: Path, images_b64: list[str], count: int) -> Path:
    """``count`` JPEG files in ``data``/input: hard links to the sample photos."""
    photos = data.parent / "photos"
    photos.mkdir(parents=True)
    originals = []
    for i, b64 in enumerate(images_b64):
        originals.append(photos / f"photo-{i}.jpg")
        originals[-1].write_bytes(base64.b64decode(b64))
    folder = data / "input"
    folder.mkdir(parents=True)
    for k in range(count):
        os.link(originals[k % len(originals)], folder / f"img-{k:05d}.jpg")
    return folder


async def calibrate(
    api: JobsApi, server: RunningServer, bodies: list[bytes], args: argparse.Namespace
) -> tuple[float, float]:
    """Median latency of one request alone, and the model's time per call (warm-ups first)."""
    times: list[float] = []
    before = None
    for i in range(args.warmup + args.calibrate):
        if i == args.warmup:
            before = await counters(api.http, server)
        start = time.perf_counter()
        response = await api.http.post(
            f"{server.url}/score", content=bodies[i % len(bodies)], headers=JSON_HEADERS
        )
        if error := check_answer(response):
            raise RuntimeError(f"a single request failed: {error}")
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    assert before is not None
    return statistics.median(times), per_call(
        before, await counters(api.http, server), "model_seconds"
    )


async def run_bench(
    server: RunningServer,
    bodies: list[bytes],
    images: list[str],
    data: Path,
    args: argparse.Namespace,
    report: dict[str, Any],
) -> list[WindowResult]:
    async with httpx.AsyncClient(timeout=60) as http:
        api = JobsApi(http, server.url)
        single, model_s = await calibrate(api, server, bodies, args)
        rate = args.rate or args.busy / single
        # the job never runs faster than the model alone could: enough rows for a window
        rows = args.job_images or min(
            20_000, max(64, math.ceil((args.duration + args.settle + 30) / model_s))
        )
        write_job_input(data, images, rows)
        report |= {
            "single_latency_s": single,
            "single_model_s": model_s,
            "rate_per_s": rate,
            "rate_from": "--rate" if args.rate else f"--busy {args.busy} / one request",
            "arrivals": args.arrivals,
            "job_images": rows,
        }
        log(
            f"one request alone: {single:.3f} s (model {model_s:.3f} s); load {rate:.3f} "
            f"requests/s; job input: {rows} images"
        )
        load = OpenLoop(server.url, bodies, rate, args.timeout, args.arrivals == "poisson")
        task = asyncio.create_task(load.run())
        windows: list[Window] = []
        try:
            await asyncio.sleep(args.settle)
            for i in range(args.repeats):
                windows += await one_round(api, server, load, i, data, args)
                for r in (result_of(w, load.samples) for w in windows[-2:]):
                    rate_text = f", job {r.job.rows_per_s:.3f} rows/s" if r.job else ""
                    log(
                        f"round {i + 1} {r.condition}: p50 {r.p50_s:.3f} s, p90 {r.p90_s:.3f} s"
                        f", {r.answered} answered, {r.errors} errors{rate_text}"
                    )
        finally:
            load.stopping = True
            await task
    pooled = {
        c: [v for w in windows if w.condition == c for v in latencies(w, load.samples)[1]]
        for c in (NO_JOB, JOB)
    }
    results = [result_of(w, load.samples) for w in windows]
    report["summary"] = summarize(results, pooled)
    return results


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-layout", default="blip-image-captioning-base")
    parser.add_argument("--duration", type=float, help="seconds per window (default 30; quick 8)")
    parser.add_argument("--repeats", type=int, help="rounds of both windows (default 5; quick 2)")
    parser.add_argument("--settle", type=float, help="s after a job starts or ends (5; quick 2)")
    parser.add_argument("--busy", type=float, default=0.45, help="load / one request's rate")
    parser.add_argument("--rate", type=float, help="requests per second (default: from --busy)")
    parser.add_argument(
        "--arrivals",
        choices=("steady", "poisson"),
        default="steady",
        help="requests at fixed intervals, or at random (exponential gaps)",
    )
    parser.add_argument("--tokens", type=int, default=20, help="min = max new tokens")
    parser.add_argument("--images", type=int, default=6, help="distinct photos")
    parser.add_argument("--job-images", type=int, help="files in the job's input folder")
    parser.add_argument("--chunk-rows", type=int, default=4, help="the server's --chunk-rows")
    parser.add_argument("--poll", type=float, default=1.0, help="seconds between polls")
    parser.add_argument("--warmup", type=int, default=3, help="requests before calibrating")
    parser.add_argument("--calibrate", type=int, default=8, help="single requests timed")
    parser.add_argument("--blipserve-args", default="", help="extra flags for blipserve serve")
    parser.add_argument("--timeout", type=float, default=600, help="per-request client timeout")
    parser.add_argument("--start-timeout", type=float, default=600, help="server and job starts")
    parser.add_argument("--out", type=Path, help=f"JSON results (default {DEFAULT_OUT})")
    parser.add_argument("--quick", action="store_true", help="tiny model, short windows")
    args = parser.parse_args()
    args.duration = args.duration or (8.0 if args.quick else 30.0)
    args.repeats = args.repeats or (2 if args.quick else 5)
    args.settle = args.settle if args.settle is not None else (2.0 if args.quick else 5.0)
    if args.out is None and not args.quick:
        args.out = DEFAULT_OUT
    return args


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    dest = CACHE / (args.model_layout + ("-quick" if args.quick else ""))
    overrides = QUICK_OVERRIDES if args.quick else None
    model = build_random_model(args.model_layout, dest, overrides=overrides).resolve()
    images = sample_images(args.images)
    bodies = [score_body(b64, args.tokens) for b64 in images]
    busy = background_cpu_busy()
    if busy > BACKGROUND_WARN:
        log(f"warning: other processes keep {busy:.0%} of the CPUs busy; timings unreliable")
    report: dict[str, Any] = {
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_info(),
        "background_cpu_busy": busy,
        "model": f"{args.model_layout} layout, random weights"
        + (" (--quick)" if args.quick else ""),
        "parameters": count_parameters(model),
        "tokens": args.tokens,
        "duration_s": args.duration,
        "repeats": args.repeats,
        "settle_s": args.settle,
    }
    with tempfile.TemporaryDirectory(prefix="bench-jobs-online-") as tmp:
        data = Path(tmp) / "data"  # the only root jobs may read and write under
        flags = {
            "--model": model,
            "--log-level": "warning",
            "--request-timeout-s": 600,
            "--jobs-dir": Path(tmp) / "jobs",
            "--jobs-allow-root": data,
            "--chunk-rows": args.chunk_rows,
        }
        argv = python_command("-m", "blipserve.cli", "--verbose", "serve")
        argv += [str(v) for pair in flags.items() for v in pair]
        argv += shlex.split(args.blipserve_args)
        log(f"starting {shlex.join(argv)}")
        server = start_server(argv, Path(tmp) / "server", timeout=args.start_timeout)
        report |= {
            "server_command": shlex.join(server.argv),
            "dtype": server_dtype("", server.output()),
        }
        try:
            results = asyncio.run(run_bench(server, bodies, images, data, args, report))
        finally:
            server.stop()
            report["server_log_tail"] = server.output()[-4000:]
    report["windows"] = [asdict(r) for r in results]
    report["total_s"] = time.perf_counter() - started
    report["markdown"] = markdown(report)
    print(report["markdown"])
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
        log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
