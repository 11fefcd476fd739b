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
import shlex
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # testkit/, shared with the tests
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package

from common import (
    CACHE,
    QUICK_BLIP,
    ROOT,
    build_random_model,
    count_parameters,
    log,
    machine_info,
    python_command,
    sample_images,
)
from server_bench import ServerResult, bench_server
from server_load import score_body
from server_report import compare, markdown

DEFAULT_LAYOUT = "blip-image-captioning-base"


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
    overrides = QUICK_BLIP if args.quick and built else None
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
