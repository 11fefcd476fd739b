"""bench/jobs_online.py's summary over all rounds (with a job against without, against
the issue's target) and its markdown."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Any

from jobs_online_results import WindowResult
from jobs_online_rounds import ENDED, JOB, NO_JOB
from server_report import ratio

from testkit.stats import percentile

TARGET_P50_RATIO = 1.3

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
