"""One server under bench/server.py's load: started, warmed up, each level of clients in
turn, stopped; what it did, as a :class:`ServerResult`."""

from __future__ import annotations

import argparse
import re
import shlex
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from common import BACKGROUND_WARN, background_cpu_busy, log
from server_load import JSON_HEADERS, LevelResult, check_answer, run_level

from testkit.live_server import RunningServer, start_server


@dataclass
class ServerResult:
    name: str
    command: str
    dtype: str
    startup_s: float
    background_cpu_busy: float
    warmup_latencies_s: list[float]
    levels: list[LevelResult] = field(default_factory=list)
    log_tail: str = ""


def server_dtype(name: str, log: str) -> str:
    if name == "baseline":
        match = re.search(r"dtype torch\.(\w+)", log)
    else:
        match = re.search(r"loading .* on \S+ as (?:torch\.)?(\w+)", log)
    return match.group(1) if match else "unknown (see the log)"


def bench_server(
    name: str, argv: list[str], workdir: Path, bodies: list[bytes], args: argparse.Namespace
) -> ServerResult:
    busy = background_cpu_busy()
    if busy > BACKGROUND_WARN:
        log(
            f"warning: other processes keep {busy:.0%} of the CPUs busy; timings will be unreliable"
        )
    log(f"{name}: starting {shlex.join(argv)}")
    started = time.perf_counter()
    server: RunningServer = start_server(
        argv, workdir, name=name, timeout=args.start_timeout, env=args.server_env
    )
    result = ServerResult(
        name=name,
        command=shlex.join(server.argv),
        dtype=server_dtype(name, server.output()),
        startup_s=time.perf_counter() - started,
        background_cpu_busy=busy,
        warmup_latencies_s=[],
    )
    log(f"{name}: ready in {result.startup_s:.1f} s, dtype {result.dtype}, {server.url}")
    try:
        with httpx.Client(timeout=args.timeout) as http:
            for i in range(args.warmup):
                start = time.perf_counter()
                response = http.post(
                    f"{server.url}/score", content=bodies[i % len(bodies)], headers=JSON_HEADERS
                )
                error = check_answer(response)
                if error:
                    raise RuntimeError(f"{name}: warm-up request failed: {error}")
                result.warmup_latencies_s.append(time.perf_counter() - start)
        log(f"{name}: warm-up latencies {[round(v, 2) for v in result.warmup_latencies_s]} s")
        for clients in args.levels:
            level = run_level(
                server.url,
                clients,
                bodies,
                duration=args.duration,
                requests=args.requests,
                timeout=args.timeout,
            )
            result.levels.append(level)
            batch = f", mean batch {level.mean_batch_size:.1f}" if level.mean_batch_size else ""
            if level.stages:
                batch += (
                    f", model {level.stages['model_s_per_image'] * 1000:.0f} ms an image, "
                    f"queue {level.stages['queue_wait_s_per_row'] * 1000:.0f} ms a row"
                )
            log(
                f"{name}: {clients:>2} clients: {level.requests} answers in "
                f"{level.window_s:.1f} s, {level.images_per_s:.3f} img/s, p50 "
                f"{level.p50_s:.2f} s, p95 {level.p95_s:.2f} s, {level.errors} errors{batch} "
                f"(level took {level.level_wall_s:.0f} s)"
            )
    finally:
        code = server.stop()
        result.log_tail = server.output()[-4000:]
        if code not in (0, -signal.SIGTERM):  # uvicorn may die by the SIGTERM it handled
            log(f"{name}: exited with {code}; log tail:\n{result.log_tail}")
    return result
