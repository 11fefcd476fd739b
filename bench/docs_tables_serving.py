"""The docs' tables of the entry points under load: bench/batch.py's `blipserve batch`,
bench/server.py's `blipserve serve`, bench/ray_serve.py's replicas and
bench/jobs_online.py's /score latency beside a hosted batch job."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from docs_tables_base import cpu_machine, load, renderer, server_levels, table


@renderer("cpu-batch")
def cpu_batch(results: Path) -> str:
    name = "batch-cpu-openvino.json"
    r = load(results, name)
    s = r["stages"]
    w, h = r["image_size"]
    return table(
        f"`{r['command']}` ({cpu_machine(r)}): {r['images']} JPEGs of {w}x{h} "
        f"(~{r['image_mb']} MB each), full-size BLIP-base with random weights, "
        f"{r['tokens']} tokens a caption.",
        ["", "images/s", "s/image", "ratio"],
        [
            f"| the catalog's loop (processor, `generate`, `batch_decode`; float32) | "
            f"{r['loop']['images_per_s']:.3f} | {1 / r['loop']['images_per_s']:.2f} | 1.00x |",
            f"| `blipserve batch` (defaults: {s['dtype']}, OpenVINO's int8 encoder, batches "
            f"of {s['batch']}) | {r['blipserve']['images_per_s']:.3f} | "
            f"{1 / r['blipserve']['images_per_s']:.2f} | **{r['ratio']:.2f}x** |",
        ],
        f"Per image, each stage alone: decoding {s['blipserve_decode_s'] * 1000:.0f} ms "
        f"(the loop's full decode and resize {s['loop_decode_and_preprocess_s'] * 1000:.0f}"
        f" ms), vision encoder {s['vision_s'] * 1000:.0f} ms, text decoder "
        f"{s['text_s'] * 1000:.0f} ms (batch {s['batch']}).",
    )


@renderer("cpu-server")
def cpu_server(results: Path) -> str:
    name = "server-cpu-openvino.json"
    r = load(results, name)
    base, ours = server_levels(r, "baseline"), server_levels(r, "blipserve")
    intro = (
        f"`{r['command']}` ({cpu_machine(r)}): N clients each sending one-image requests "
        f"(640x480 JPEG, {r['tokens']} tokens) in a closed loop, {r['duration_s']:.0f} s per "
        "level, against `blipserve serve` (defaults) and a server doing what the catalog's "
        "scoring wrapper does (float32, one request at a time); full-size BLIP-base, "
        "random weights."
    )
    rows = []
    for clients in r["levels"]:
        b, o = base[clients], ours[clients]
        rows.append(
            f"| {clients} | {b['images_per_s']:.3f} | {o['images_per_s']:.3f} | "
            f"{o['images_per_s'] / b['images_per_s']:.2f}x | {b['p50_s']:.2f} s / "
            f"{o['p50_s']:.2f} s | {o['mean_batch_size']:.1f} |"
        )
    columns = [
        "clients",
        "baseline images/s",
        "blipserve images/s",
        "ratio",
        "p50 latency baseline / blipserve",
        "mean batch",
    ]
    return table(intro, columns, rows, left=0) + server_stages(ours, r["levels"])


#: server_load.level_stages' keys, in the stage table's column order
SERVER_STAGES = (
    "server_request_s",
    "decode_s_per_request",
    "queue_wait_s_per_row",
    "model_s_per_batch",
    "model_s_per_image",
)


def server_stages(levels: dict[int, Any], clients: list[int]) -> str:
    """Where blipserve's requests spent their time at each level (its /metrics over the
    level: ``server_load.level_stages``), for results that carry it."""
    rows = []
    for n in clients:
        s = levels[n].get("stages")
        if s:
            cells = (s.get(k, math.nan) * 1000 for k in SERVER_STAGES)  # (NaN: none seen)
            rows.append(f"| {n} |" + "".join(f" {c:.0f} |" if c == c else " - |" for c in cells))
    if not rows:
        return ""
    intro = (
        "\n\nWhere blipserve's requests spent their time (ms; means from its `/metrics` over "
        "each level): a request in the server, its image's decoding, a row's wait for its "
        "batch, the model's call for a batch and per image:"
    )
    columns = [
        "clients",
        "request",
        "decoding",
        "wait for a batch",
        "model a batch",
        "model an image",
    ]
    return table(intro, columns, rows, left=0)


@renderer("cpu-ray-serve")
def cpu_ray_serve(results: Path) -> str:
    name = "ray-serve-cpu.json"
    r = load(results, name)
    summary, cores = r["summary"], r["machine"]["usable_cores"]
    intro = (
        f"`{r['command']}` ({cpu_machine(r)}): {r['clients']} clients each sending one-image "
        f"requests (640x480 JPEG, {r['tokens']} tokens) in a closed loop, {r['duration_s']:.0f} s "
        f"per setup, the setups in turn over {r['repeats']} rounds; full-size BLIP-base, "
        "random weights, defaults otherwise."
    )
    flags = {
        "serve": "`blipserve serve`",
        "ray-1": f"`--ray --replicas 1 --num-cpus {cores}`",
        "ray-2": f"`--ray --replicas 2 --num-cpus {cores / 2:g}`",
    }
    rows = [
        f"| {flags[setup]} | {', '.join(f'{v:.2f}' for v in summary['images_per_s'][setup])} | "
        f"{summary['median_images_per_s'][setup]:.2f} |"
        for setup in r["setups"]
    ]
    ratios = summary["ratios"]
    after = "; ".join(
        f"{label}: {ratios[key]['of_medians']:.2f}x (rounds "
        f"{', '.join(f'{v:.2f}' for v in ratios[key]['per_round'])})"
        for key, label in (
            ("ray-1 / serve", "one replica / blipserve serve"),
            ("ray-2 / ray-1", "two replicas / one"),
        )
    )
    return table(intro, ["setup", "images/s per round", "median"], rows, after=after + ".")


@renderer("cpu-jobs-online")
def cpu_jobs_online(results: Path) -> str:
    """/score latency with and without a hosted batch job, steady and random arrivals."""
    runs = [load(results, n) for n in ("jobs-online-cpu.json", "jobs-online-poisson-cpu.json")]
    first = runs[0]
    intro = (
        f"`python bench/jobs_online.py [--arrivals poisson]` ({cpu_machine(first)}): one "
        f"`blipserve serve --jobs-dir ... --chunk-rows 4`, full-size BLIP-base (random "
        f"weights, int8), one-image requests (640x480 JPEG, {first['tokens']} tokens) at "
        "fixed intervals or at random (Poisson), ~45% of the model's time, windows of "
        f"{first['duration_s']:.0f} s without and with a batch job captioning a folder of the "
        f"same photos, alternating over {first['repeats']} rounds; the defaults "
        "(`--jobs-share` 0.1, full batches after 10 s without a request)."
    )
    rows = []
    for r in runs:
        arrivals = r.get("arrivals", "steady")
        c, ratios = r["summary"]["conditions"], r["summary"]["ratios"]
        for name in ("no job", "job"):
            v = c[name]
            job = v["median_job_rows_per_s"]
            rows.append(
                f"| {arrivals} | {name} | {v['median_s']['p50']:.3f} | {v['median_s']['p90']:.3f} "
                f"| {v['pooled_s']['p99']:.3f} | {v['answered']} | {v['errors']} | "
                f"{'-' if job is None else f'{job:.2f}'} |"
            )
        rows.append(
            f"| {arrivals} | job / no job | {ratios['p50 job / no job']['of_medians']:.2f}x | "
            f"{ratios['p90 job / no job']['of_medians']:.2f}x | "
            f"{ratios['p99 job / no job']['pooled']:.2f}x | | | |"
        )
    columns = ["arrivals", "window", "p50 s", "p90 s", "p99 s (pooled)", "answered", "errors"]
    return table(intro, [*columns, "job rows/s"], rows, left=2)
