"""One level of load on a server: ``clients`` closed-loop clients, each sending one-image
``POST /score`` requests (the next as soon as the last answers), measured once every client
has had its first answer (bench/server.py's method; bench/ray_serve.py and
bench/jobs_online.py send the same bodies)."""

from __future__ import annotations

import json
import math
import re
import statistics
import threading
import time
from dataclasses import dataclass

import httpx

from testkit.stats import percentile

JSON_HEADERS = {"Content-Type": "application/json"}


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
    # where a request's time went inside the server, from its /metrics over the level
    # (warm-up and drain included; None where the server has no blipserve /metrics)
    stages: dict[str, float] | None = None


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


#: blipserve's histograms whose sums and counts make a level's stages (server/metrics.py)
_HISTOGRAMS = ("batch_size", "queue_wait_seconds", "decode_seconds", "model_seconds")
_SERIES = re.compile(
    r"^blipserve_(?P<name>\w+?)_(?P<part>sum|count|total)"
    r"(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$",
    re.M,
)


def metrics_snapshot(url: str) -> dict[str, float] | None:
    """Sums and counts of blipserve's histograms (``NAME_sum``, ``NAME_count``, the
    ``/score`` route's ``request_seconds``) and its images counter, from ``url``'s
    ``/metrics``; None where there is no such page."""
    try:
        response = httpx.get(f"{url}/metrics", timeout=10)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    out: dict[str, float] = {}
    for m in _SERIES.finditer(response.text):
        name, part, labels = m["name"], m["part"], m["labels"] or ""
        if name in _HISTOGRAMS and not labels:
            out[f"{name}_{part}"] = float(m["value"])
        elif name == "request_seconds" and 'route="/score"' in labels:
            out[f"request_seconds_{part}"] = float(m["value"])
        elif name == "images" and part == "total":
            out["images"] = float(m["value"])
    return out if "batch_size_sum" in out and "batch_size_count" in out else None


def histogram_mean(before: dict[str, float], after: dict[str, float], name: str) -> float:
    """The mean observation of blipserve's histogram ``name`` between two
    :func:`metrics_snapshot` s (NaN where it observed nothing)."""
    count = after.get(f"{name}_count", 0.0) - before.get(f"{name}_count", 0.0)
    total = after.get(f"{name}_sum", 0.0) - before.get(f"{name}_sum", 0.0)
    return total / count if count > 0 else math.nan


def level_stages(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Per-request stages inside the server between two :func:`metrics_snapshot` s: seconds
    per model batch and per image (model-thread time: with several model workers batches
    overlap), a row's wait for its batch, a request's image decoding, and the server's
    whole-request time (the client's latency less it is HTTP and the client itself)."""

    images = after.get("images", 0.0) - before.get("images", 0.0)
    model = after.get("model_seconds_sum", 0.0) - before.get("model_seconds_sum", 0.0)
    return {
        "model_s_per_batch": histogram_mean(before, after, "model_seconds"),
        "model_s_per_image": model / images if images > 0 else math.nan,
        "queue_wait_s_per_row": histogram_mean(before, after, "queue_wait_seconds"),
        "decode_s_per_request": histogram_mean(before, after, "decode_seconds"),
        "server_request_s": histogram_mean(before, after, "request_seconds"),
    }


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

    before = metrics_snapshot(url)
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
    after = metrics_snapshot(url)

    window = max(t_stop - t_warm, 1e-9)
    answered = [s for s in samples if s.ok and t_warm < s.end <= t_stop]
    latencies = [s.end - s.start for s in samples if s.ok and t_warm <= s.start < t_stop]
    errors = [s for s in samples if not s.ok]
    mean = statistics.fmean(latencies) if latencies else math.nan
    batch = stages = None
    if before and after and after["batch_size_count"] > before["batch_size_count"]:
        batch = histogram_mean(before, after, "batch_size")
        stages = level_stages(before, after)
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
        stages=stages,
    )
