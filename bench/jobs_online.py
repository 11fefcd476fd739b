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
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # testkit/, shared with the tests
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package

from common import (
    BACKGROUND_WARN,
    CACHE,
    QUICK_BLIP,
    ROOT,
    background_cpu_busy,
    build_random_model,
    count_parameters,
    log,
    machine_info,
    python_command,
    sample_images,
)
from jobs_online_load import OpenLoop, counters, per_call
from jobs_online_report import markdown, summarize
from jobs_online_results import WindowResult, latencies, result_of
from jobs_online_rounds import JOB, NO_JOB, JobsApi, Window, one_round
from server_bench import server_dtype
from server_load import JSON_HEADERS, check_answer, score_body

from testkit.live_server import RunningServer, start_server

DEFAULT_OUT = ROOT / "bench" / "results" / "jobs-online-cpu.json"


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
    overrides = QUICK_BLIP if args.quick else None
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
