"""bench/jobs_online.py's figures per window: latencies of the requests due in it, the
model's share, CPU, and the job's progress."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from jobs_online_load import Sample, per_call
from jobs_online_rounds import Window

from testkit.stats import percentile


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
