"""bench/server.py's report: the two servers compared level by level, against the issue's
targets, and as markdown."""

from __future__ import annotations

import math
from typing import Any

from server_bench import ServerResult


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
