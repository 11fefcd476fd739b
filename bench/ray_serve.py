"""Benchmark `blipserve serve --ray` (Ray Serve replicas) against `blipserve serve` alone.

What it measures: captioning throughput (images/s) and latency at 16 closed-loop clients
(``--clients``), each sending one-image ``POST /score`` requests of exactly ``--tokens``
new tokens (bench/server.py's load generator and request bodies: scikit-image photos at
640x480, JPEG, base64), for three setups started one after the other, never two at once:

* ``serve``: ``blipserve serve`` alone, one process (torch on every core);
* ``ray-1``: ``blipserve serve --ray --replicas 1 --num-cpus N`` (N = the machine's cores):
  the same engine behind Serve's HTTP proxy; against ``serve``, the proxy's cost;
* ``ray-2``: ``--replicas 2 --num-cpus N/2``: two engines, each on half the cores; against
  ``ray-1``, what a second replica gives on the same cores.

On a 2-core machine two replicas share the cores one replica already uses, so ``ray-2``
cannot be expected to double anything: it shows what splitting costs or gains (smaller
batches per replica, two model threads). Each setup starts its own local Ray cluster.
Setups run in turn, ``--repeats`` times, and each ratio is reported from the medians and
for every round (this machine is shared and noisy: compare only within one run).

    .venv/bin/python bench/ray_serve.py                       # BLIP-base, ~25 min on 2 cores
    .venv/bin/python bench/ray_serve.py --quick --out /tmp/q.json   # tiny model, ~4 min
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

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
from server_report import ratio

from testkit.env import RAY_ENV as QUIET_RAY

SETUPS = ("serve", "ray-1", "ray-2")
#: what a cluster operator sets (docs/deploying.md); Ray quiet and offline
RAY_ENV = {**QUIET_RAY, "RAY_DEDUP_LOGS": "0"}


def setup_flags(setup: str, cores: int) -> list[str]:
    if setup == "serve":
        return []
    replicas = int(setup.split("-")[1])
    cpus = max(cores / replicas, 1)
    return ["--ray", "--replicas", str(replicas), "--num-cpus", f"{cpus:g}"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-layout", default="blip-image-captioning-base")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration", type=float, help="seconds measured (default 60; quick 5)")
    parser.add_argument("--repeats", type=int, help="rounds of all setups (default 3; quick 1)")
    parser.add_argument("--tokens", type=int, default=20, help="min = max new tokens")
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--setups", default=",".join(SETUPS), type=lambda v: v.split(","))
    parser.add_argument("--blipserve-args", default="", help="extra flags for every setup")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--start-timeout", type=float, default=900)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--quick", action="store_true", help="tiny model, one short round")
    args = parser.parse_args()
    if set(args.setups) - set(SETUPS):
        parser.error(f"setups are {', '.join(SETUPS)}")
    args.duration = args.duration or (5.0 if args.quick else 60.0)
    args.repeats = args.repeats or (1 if args.quick else 3)
    # bench_server's own settings: one level, measured by time, a few warm-up requests
    args.levels, args.requests, args.warmup = [args.clients], None, 2 if args.quick else 4
    args.server_env = RAY_ENV
    if args.out is None:
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        args.out = (
            ROOT / "bench" / "results" / f"ray-serve-{stamp}{'-quick' if args.quick else ''}.json"
        )
    return args


def summarize(rounds: list[dict[str, ServerResult]], setups: list[str]) -> dict[str, Any]:
    rates = {s: [r[s].levels[0].images_per_s for r in rounds if s in r] for s in setups}
    medians = {s: statistics.median(v) for s, v in rates.items() if v}
    pairs = {"ray-1 / serve": ("ray-1", "serve"), "ray-2 / ray-1": ("ray-2", "ray-1")}
    ratios = {
        name: {
            "of_medians": ratio(medians[a], medians[b]),
            "per_round": [
                ratio(r[a].levels[0].images_per_s, r[b].levels[0].images_per_s) for r in rounds
            ],
        }
        for name, (a, b) in pairs.items()
        if a in medians and b in medians
    }
    return {"images_per_s": rates, "median_images_per_s": medians, "ratios": ratios}


def markdown(report: dict[str, Any]) -> str:
    machine = report["machine"]
    lines = [
        "## blipserve serve --ray (Ray Serve replicas) vs blipserve serve (bench/ray_serve.py)",
        "",
        f"- command: `{report['command']}`",
        f"- date: {report['date']}, total {report['total_s'] / 60:.1f} min",
        f"- machine: {machine['cpu']}, {machine['usable_cores']} cores, torch {machine['torch']}",
        f"- model: {report['model']}, {report['parameters'] / 1e6:.1f}M stored parameters",
        f"- load: {report['clients']} closed-loop clients, one 640x480 JPEG a request, "
        f"{report['tokens']} new tokens; {report['duration_s']:.0f} s measured per setup, "
        f"{report['repeats']} round(s), setups in turn",
        "",
        "| setup | flags | img/s per round | median img/s |",
        "|---|---|---|---:|",
    ]
    summary = report["summary"]
    for setup in report["setups"]:
        per = ", ".join(f"{v:.2f}" for v in summary["images_per_s"][setup])
        flags = " ".join(setup_flags(setup, machine["usable_cores"])) or "(none)"
        lines.append(
            f"| {setup} | `{flags}` | {per} | {summary['median_images_per_s'][setup]:.2f} |"
        )
    lines += ["", "| ratio | of medians | per round |", "|---|---:|---|"]
    for name, r in summary["ratios"].items():
        per_round = ", ".join(f"{v:.2f}x" for v in r["per_round"])
        lines.append(f"| {name} | {r['of_medians']:.2f}x | {per_round} |")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    overrides = QUICK_BLIP if args.quick else None
    dest = CACHE / (args.model_layout + ("-quick" if args.quick else ""))
    model = build_random_model(args.model_layout, dest, overrides=overrides).resolve()
    bodies = [score_body(b64, args.tokens) for b64 in sample_images(args.images)]
    cores = len(os.sched_getaffinity(0))
    base = python_command("-m", "blipserve.cli", "--verbose", "serve", "--model", str(model))
    base += ["--request-timeout-s", "600", *args.blipserve_args.split()]
    rounds: list[dict[str, ServerResult]] = []
    with tempfile.TemporaryDirectory(prefix="bench-ray-serve-") as tmp:
        for i in range(args.repeats):
            results = {}
            for setup in args.setups:
                argv = [*base, *setup_flags(setup, cores)]
                workdir = Path(tmp) / f"{setup}-{i}"
                results[setup] = bench_server(setup, argv, workdir, bodies, args)
            rounds.append(results)
            log(f"round {i + 1}: " + json.dumps(summarize([results], args.setups)["ratios"]))
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "total_s": time.perf_counter() - started,
        "machine": machine_info(),
        "model": f"{args.model_layout} layout, random weights"
        + (" (--quick)" if args.quick else ""),
        "parameters": count_parameters(model),
        "clients": args.clients,
        "tokens": args.tokens,
        "duration_s": args.duration,
        "repeats": args.repeats,
        "setups": args.setups,
        "rounds": [{s: asdict(r) for s, r in results.items()} for results in rounds],
        "summary": summarize(rounds, args.setups),
    }
    report["markdown"] = markdown(report)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(report["markdown"])
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
