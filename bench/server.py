"""Benchmark `blipserve serve` against the Azure ML catalog's way of serving BLIP.

What it measures: captioning throughput (images/s) and latency (p50/p95 per request) over
HTTP, at several levels of concurrency (default 1, 4 and 16 clients).  Each client sends
one-image ``POST /score`` requests in a closed loop (the next as soon as the last answers),
with fixed-length generation (``min_new_tokens = max_new_tokens = 20`` in ``params``) so
that every request costs the same model work on both servers.  Test images are
scikit-image sample photos at 640x480, JPEG, base64.

The two servers run one after the other on the same model folder (never both at once):

* **baseline** (``bench/baseline_server.py``): what the Azure ML catalog's scoring wrapper
  does for BLIP -- per request, PIL-decode the base64 images, ``processor(images=...)``,
  ``model.generate(...)``, ``processor.batch_decode(...)``; float32; one request at a time,
  no batching across requests.
* **blipserve**: ``blipserve serve --model FOLDER`` with its defaults (dtype ``auto``:
  int8 on a CPU with torch's int8 kernels, else bfloat16 where native, else float32; the
  mode used is read from its log and reported), plus
  ``--blipserve-args`` (e.g. ``"--dtype bfloat16 --max-batch-size 16"``).  Its request
  deadline is raised to 600 s so that queueing at high concurrency is measured, not cut.

The model is by default a random-weight copy of ``Salesforce/blip-image-captioning-base``
built from its published config, tokenizer and processor settings (``tests/data/
hf-layouts``): full size (~224M stored parameters, 384 px ViT-B/16), cached in
``~/.cache/blipserve-bench``.  Random weights give nonsense captions but the same compute;
``min_new_tokens`` makes every caption 20 tokens long.

How a level is measured: every client's first request is warm-up (queues fill, batches
form); the measurement window opens when the last client has had its first answer and
lasts ``--duration`` seconds (or until ``--requests`` answers).  Throughput = answers
completed in the window / window length; latencies are those of the requests sent in the
window (they are let finish after it closes).  ``little_law_images_per_s`` in the JSON
(clients / mean latency) is a cross-check of the throughput.  For blipserve the mean batch
size over the level comes from its ``/metrics``.

Target (our issue): at 16 clients, blipserve's throughput at least 3x the baseline's; at 1
client, its latency no worse than the baseline's (p50).

    .venv/bin/python bench/server.py                       # full run, ~11 min on 2 cores
    .venv/bin/python bench/server.py --quick --out /tmp/q.json   # tiny model, ~1 min
    .venv/bin/python bench/server.py --blipserve-args "--dtype bfloat16 --max-batch-size 16"

Run it on a quiet machine: other busy processes (even niced ones, across sessions) take
CPU from the servers; the harness measures the background load before each server and
warns when it is high.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import re
import shlex
import signal
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # bench/ is not a package: found through sys.path
    QUICK_BLIP,
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

DEFAULT_LAYOUT = "blip-image-captioning-base"
CACHE = Path.home() / ".cache" / "blipserve-bench"
JSON_HEADERS = {"Content-Type": "application/json"}
# --quick: the same architecture, tokenizer and processor, shrunk to a tiny network.
QUICK_OVERRIDES = QUICK_BLIP
BACKGROUND_WARN = 0.10  # warn when other processes keep this share of the CPUs busy


# -- one level of load ---------------------------------------------------------------------


@dataclass
class Sample:
    client: int
    start: float
    end: float
    ok: bool
    error: str | None = None


@dataclass
class LevelResult:
    clients: int
    window_s: float
    requests: int  # answered within the measurement window
    images_per_s: float
    p50_s: float
    p95_s: float
    mean_s: float
    latency_samples: int
    little_law_images_per_s: float
    requests_total: int  # including warm-up and drain
    errors: int
    first_error: str | None
    mean_batch_size: float | None
    level_wall_s: float


def score_body(image_b64: str, tokens: int) -> bytes:
    return json.dumps(
        {
            "input_data": {"columns": ["image"], "data": [[image_b64]]},
            "params": {"max_new_tokens": tokens, "min_new_tokens": tokens},
        }
    ).encode()


def check_answer(response: httpx.Response) -> str | None:
    """None for a good answer (200, ``[{"text": str}]``), else what is wrong with it."""
    if response.status_code != 200:
        return f"HTTP {response.status_code}: {response.text[:300]}"
    try:
        answer = response.json()
        if isinstance(answer, list) and len(answer) == 1 and isinstance(answer[0]["text"], str):
            return None
    except (ValueError, KeyError, TypeError):
        pass
    return f"unexpected answer: {response.text[:300]}"


def metrics_batches(url: str) -> tuple[float, float] | None:
    """(sum, count) of blipserve's batch-size histogram; None where there is no /metrics."""
    try:
        response = httpx.get(f"{url}/metrics", timeout=10)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    values = dict(re.findall(r"^blipserve_batch_size_(sum|count) (\S+)$", response.text, re.M))
    if "sum" not in values or "count" not in values:
        return None
    return float(values["sum"]), float(values["count"])


def run_level(
    url: str,
    clients: int,
    bodies: list[bytes],
    *,
    duration: float,
    requests: int | None,
    timeout: float,
) -> LevelResult:
    """``clients`` closed-loop clients; measure once each has had its first answer."""
    cond = threading.Condition()
    stop = threading.Event()
    samples: list[Sample] = []
    first_end: dict[int, float] = {}

    def client(i: int) -> None:
        with httpx.Client(timeout=timeout) as http:
            k = i
            while not stop.is_set():
                body = bodies[k % len(bodies)]
                k += 1
                start = time.perf_counter()
                try:
                    error = check_answer(
                        http.post(f"{url}/score", content=body, headers=JSON_HEADERS)
                    )
                except Exception as exc:  # any failure is a failed request, never a hang
                    error = f"{type(exc).__name__}: {exc}"
                end = time.perf_counter()
                with cond:
                    samples.append(Sample(i, start, end, error is None, error))
                    first_end.setdefault(i, end)
                    cond.notify_all()

    before = metrics_batches(url)
    level_start = time.perf_counter()
    threads = [
        threading.Thread(target=client, args=(i,), name=f"client-{i}", daemon=True)
        for i in range(clients)
    ]
    for t in threads:
        t.start()
    try:
        with cond:
            if not cond.wait_for(lambda: len(first_end) == clients, timeout=timeout * 2):
                raise RuntimeError(f"{clients} clients: no answer to every client in time")
            t_warm = max(first_end.values())
        if requests is None:
            t_stop = t_warm + duration
            time.sleep(max(0.0, t_stop - time.perf_counter()))
        else:
            with cond:

                def ends() -> list[float]:
                    return sorted(s.end for s in samples if s.ok and s.end > t_warm)

                cond.wait_for(lambda: len(ends()) >= requests, timeout=timeout * (requests + 1))
                done = ends()
                t_stop = done[requests - 1] if len(done) >= requests else time.perf_counter()
        stop.set()
    finally:
        stop.set()
        for t in threads:  # drain: let the requests in flight finish
            t.join()
    level_wall = time.perf_counter() - level_start
    after = metrics_batches(url)

    window = max(t_stop - t_warm, 1e-9)
    answered = [s for s in samples if s.ok and t_warm < s.end <= t_stop]
    latencies = [s.end - s.start for s in samples if s.ok and t_warm <= s.start < t_stop]
    errors = [s for s in samples if not s.ok]
    mean = statistics.fmean(latencies) if latencies else math.nan
    batch = None
    if before and after and after[1] > before[1]:
        batch = (after[0] - before[0]) / (after[1] - before[1])
    return LevelResult(
        clients=clients,
        window_s=window,
        requests=len(answered),
        images_per_s=len(answered) / window,
        p50_s=percentile(latencies, 50),
        p95_s=percentile(latencies, 95),
        mean_s=mean,
        latency_samples=len(latencies),
        little_law_images_per_s=clients / mean if latencies else math.nan,
        requests_total=len(samples),
        errors=len(errors),
        first_error=errors[0].error if errors else None,
        mean_batch_size=batch,
        level_wall_s=level_wall,
    )


# -- one server ----------------------------------------------------------------------------


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


def background_cpu_busy(seconds: float = 1.0) -> float:
    """Share (0-1) of all CPUs busy over ``seconds``, from /proc/stat (NaN if unreadable)."""

    def snapshot() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields[:8]), idle

    try:
        total0, idle0 = snapshot()
        time.sleep(seconds)
        total1, idle1 = snapshot()
    except (OSError, ValueError, IndexError):
        return math.nan
    total = total1 - total0
    return (total - (idle1 - idle0)) / total if total else math.nan


def server_dtype(name: str, log: str) -> str:
    if name == "baseline":
        match = re.search(r"dtype torch\.(\w+)", log)
    else:
        match = re.search(r"loading .* on \S+ as (?:torch\.)?(\w+)", log)
    return match.group(1) if match else "unknown (see the log)"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


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


# -- report --------------------------------------------------------------------------------


def ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(a) and not math.isnan(b) else math.nan


def markdown(report: dict[str, Any]) -> str:
    machine = report["machine"]
    servers = {s["name"]: s for s in report["servers"]}
    lines = [
        "## blipserve vs the catalog baseline (bench/server.py)",
        "",
        f"- command: `{report['command']}`",
        f"- date: {report['date']}, total {report['total_s'] / 60:.1f} min",
        f"- machine: {machine['cpu']}, {machine['usable_cores']} cores, torch "
        f"{machine['torch']} ({machine['torch_threads']} threads), transformers "
        f"{machine['transformers']}, Python {machine['python']}",
        (
            f"- model: {report['model']['layout']} layout, random weights, "
            if report["model"]["layout"]
            else f"- model: {report['model']['folder']}, "
        )
        + f"{report['model']['parameters'] / 1e6:.1f}M stored parameters"
        + (" (--quick: shrunk network)" if report["model"]["overrides"] else ""),
        f"- work: one 640x480 JPEG per request, {report['tokens']} new tokens exactly; "
        + (
            f"{report['duration_s']:.0f} s window per level"
            if report["requests"] is None
            else f"{report['requests']} answers per level"
        )
        + f" after each client's first answer; {report['warmup']} warm-up request(s) per server",
    ]
    if report["server_env"]:
        env = " ".join(f"{k}={v}" for k, v in report["server_env"].items())
        lines.append(f"- server environment: {env}")
    for s in report["servers"]:
        lines.append(
            f"- {s['name']}: dtype {s['dtype']}, ready in {s['startup_s']:.0f} s, "
            f"background CPU busy {s['background_cpu_busy']:.0%} before start: "
            f"`{s['command']}`"
        )
    lines += [
        "",
        "| clients | server | answers | img/s | p50 s | p95 s | mean batch | errors |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s in report["servers"]:
        for lv in s["levels"]:
            batch = lv["mean_batch_size"]
            lines.append(
                f"| {lv['clients']} | {s['name']} | {lv['requests']} | "
                f"{lv['images_per_s']:.3f} | {lv['p50_s']:.2f} | {lv['p95_s']:.2f} | "
                f"{'-' if batch is None else f'{batch:.1f}'} | {lv['errors']} |"
            )
    if "baseline" in servers and "blipserve" in servers:
        lines += [
            "",
            "| clients | throughput blipserve/baseline | p50 latency baseline/blipserve |",
            "|---:|---:|---:|",
        ]
        for row in report["comparison"]:
            lines.append(
                f"| {row['clients']} | {row['throughput_ratio']:.2f}x | "
                f"{row['p50_latency_ratio']:.2f}x |"
            )
        lines.append("")
        for target in report["targets"]:
            verdict = "met" if target["met"] else "NOT met"
            lines.append(f"- target: {target['target']}: {target['value']:.2f}x -> {verdict}")
    errors = [
        f"{s['name']} at {lv['clients']} clients: {lv['errors']} errors, first: {lv['first_error']}"
        for s in report["servers"]
        for lv in s["levels"]
        if lv["errors"]
    ]
    if errors:
        lines += ["", *(f"- ERRORS: {e}" for e in errors)]
    return "\n".join(lines)


def compare(servers: dict[str, ServerResult]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    if "baseline" not in servers or "blipserve" not in servers:
        return [], []
    base = {lv.clients: lv for lv in servers["baseline"].levels}
    blip = {lv.clients: lv for lv in servers["blipserve"].levels}
    rows = [
        {
            "clients": c,
            "throughput_ratio": ratio(blip[c].images_per_s, base[c].images_per_s),
            "p50_latency_ratio": ratio(base[c].p50_s, blip[c].p50_s),
        }
        for c in sorted(base.keys() & blip.keys())
    ]
    targets = []
    by_clients = {r["clients"]: r for r in rows}
    if 16 in by_clients:
        value = by_clients[16]["throughput_ratio"]
        targets.append(
            {"target": "16 clients: throughput >= 3x baseline", "value": value, "met": value >= 3}
        )
    if 1 in by_clients:
        value = by_clients[1]["p50_latency_ratio"]
        targets.append(
            {
                "target": "1 client: p50 latency no worse than baseline (ratio >= 1)",
                "value": value,
                "met": value >= 1,
            }
        )
    return rows, targets


# -- main ----------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-layout", default=DEFAULT_LAYOUT, help="tests/data/hf-layouts/*")
    parser.add_argument(
        "--model", type=Path, help="use this model folder as is (no random model is built)"
    )
    parser.add_argument("--cache-dir", type=Path, default=CACHE, help="random models go here")
    parser.add_argument(
        "--levels",
        default="1,4,16",
        type=lambda v: [int(x) for x in v.split(",")],
        help="concurrent clients, comma-separated (default 1,4,16)",
    )
    parser.add_argument(
        "--duration", type=float, help="seconds measured per level (default 75; --quick 2)"
    )
    parser.add_argument(
        "--requests", type=int, help="measure this many answers per level instead of --duration"
    )
    parser.add_argument(
        "--warmup", type=int, help="warm-up requests per server (default 3; --quick 1)"
    )
    parser.add_argument("--tokens", type=int, default=20, help="min = max new tokens")
    parser.add_argument("--images", type=int, default=6, help="distinct test images")
    parser.add_argument(
        "--servers",
        default="baseline,blipserve",
        type=lambda v: v.split(","),
        help="which servers, in this order (default baseline,blipserve)",
    )
    parser.add_argument(
        "--blipserve-args",
        default="",
        help='extra flags for blipserve serve, e.g. "--dtype bfloat16"',
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        help="OMP_NUM_THREADS/MKL_NUM_THREADS for both servers (default: torch's own choice)",
    )
    parser.add_argument("--timeout", type=float, default=600, help="per-request client timeout")
    parser.add_argument("--start-timeout", type=float, default=600, help="server start limit")
    parser.add_argument("--out", type=Path, help="JSON results (default bench/results/...)")
    parser.add_argument("--workdir", type=Path, help="server logs and port files (default: temp)")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: tiny model, 2 s per level (< 1 min)"
    )
    args = parser.parse_args()
    unknown = set(args.servers) - {"baseline", "blipserve"}
    if unknown:
        parser.error(f"unknown server(s): {', '.join(sorted(unknown))}")
    if args.duration is None:
        args.duration = 2.0 if args.quick else 75.0
    if args.warmup is None:
        args.warmup = 1 if args.quick else 3
    args.server_env = {}
    if args.torch_threads:
        threads = str(args.torch_threads)
        args.server_env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    if args.out is None:
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        suffix = "-quick" if args.quick else ""
        args.out = ROOT / "bench" / "results" / f"server-{stamp}{suffix}.json"
    return args


def main() -> None:
    args = parse_args()
    total_start = time.perf_counter()
    built = args.model is None
    overrides = QUICK_OVERRIDES if args.quick and built else None
    if built:
        dest = args.cache_dir / (args.model_layout + ("-quick" if args.quick else ""))
        log(f"model: {dest} (built once from tests/data/hf-layouts/{args.model_layout})")
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        args.model = build_random_model(args.model_layout, dest, overrides=overrides)
    model = args.model.resolve()
    bodies = [score_body(b64, args.tokens) for b64 in sample_images(args.images)]
    commands = {
        "baseline": python_command(
            str(ROOT / "bench" / "baseline_server.py"), "--model", str(model)
        ),
        "blipserve": python_command(
            "-m",
            "blipserve.cli",
            "--verbose",  # its log says which dtype it loaded
            "serve",
            "--model",
            str(model),
            "--log-level",
            "warning",
            "--request-timeout-s",
            "600",
            *shlex.split(args.blipserve_args),
        ),
    }
    machine = machine_info()
    results: dict[str, ServerResult] = {}
    with tempfile.TemporaryDirectory(prefix="blipserve-bench-") as tmp:
        workdir = args.workdir or Path(tmp)
        for name in args.servers:
            results[name] = bench_server(name, commands[name], workdir, bodies, args)

    rows, targets = compare(results)
    report = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "command": shlex.join(sys.orig_argv),
        "machine": machine,
        "model": {
            "folder": str(model),
            "layout": args.model_layout if built else None,
            "overrides": overrides,
            "parameters": count_parameters(model),
        },
        "tokens": args.tokens,
        "duration_s": args.duration,
        "requests": args.requests,
        "warmup": args.warmup,
        "levels": args.levels,
        "server_env": args.server_env,
        "servers": [asdict(r) for r in results.values()],
        "comparison": rows,
        "targets": targets,
        "total_s": time.perf_counter() - total_start,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(markdown(report))
    print(f"\nJSON: {args.out}")


if __name__ == "__main__":
    main()
