"""The docs' measured numbers, rendered from the committed results files.

Every table (and the README's headline) of measured numbers in ``README.md`` and
``docs/*.md`` sits between ``<!-- results: NAME -->`` and ``<!-- /results -->``, and is
exactly what NAME's renderer below makes of files in ``bench/results``.  A new run of a
benchmark writes its JSON; this script then rewrites the blocks:

    python bench/docs_tables.py            # rewrite every block from the results files
    python bench/docs_tables.py --check    # exit 1 naming each block that differs

``tests/unit/test_docs_tables.py`` runs the check, so a results file and the text quoting
it cannot drift apart.  Dated runs and their caveats live in ``bench/results/HISTORY.md``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
BLOCK = re.compile(r"(<!-- results: ([\w-]+) -->\n)(.*?)(<!-- /results -->)", re.DOTALL)

Renderer = Callable[[Path], str]
RENDERERS: dict[str, Renderer] = {}


def renderer(name: str) -> Callable[[Renderer], Renderer]:
    def register(fn: Renderer) -> Renderer:
        RENDERERS[name] = fn
        return fn

    return register


def load(results: Path, name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((results / name).read_text())
    return data


def span(values: Iterable[float] | None, fmt: str = ".2f") -> str:
    """`` (lo-hi)`` over repeated passes, or nothing for one pass."""
    values = list(values or [])
    if len(values) < 2:
        return ""
    return f" ({min(values):{fmt}}-{max(values):{fmt}})"


def cpu_machine(report: dict[str, Any]) -> str:
    m = report["machine"]
    return f"{m['cpu']}, {m['usable_cores']} cores, torch {m['torch'].split('+')[0]}"


def speed_model(report: dict[str, Any], layout: str) -> dict[str, Any]:
    return next(m for m in report["models"] if m["layout"] == layout)


def table(
    intro: str, columns: Sequence[str], rows: Iterable[str], after: str = "", left: int = 1
) -> str:
    """A results block: ``intro``, a blank line, the header row of ``columns``, its separator
    (the first ``left`` columns aligned left, the others right: they hold numbers), the
    ``rows`` (each already a ``| ... |`` line), and ``after`` as a paragraph of its own.

    Rows stay lines rather than cells: the docs' rows space an empty cell two ways (``| |``
    leading, ``|  |`` trailing), and a block must stay byte for byte what it was."""
    header = "|" + "".join(f" {c} |" if c else " |" for c in columns)
    separator = "|" + "".join("---|" if i < left else "---:|" for i in range(len(columns)))
    return "\n".join([intro, "", header, separator, *rows, *(["", after] if after else [])])


CPU_MODES = {
    "int8": "int8, torch's encoder (blipserve's int8 kernel)",
    "int8+ov": "**int8, OpenVINO static int8 encoder (default)**",
}


@renderer("cpu-blip-base")
def cpu_blip_base(results: Path) -> str:
    name = "speed-cpu-openvino-int8.json"
    report = load(results, name)
    model = speed_model(report, "blip-image-captioning-base")
    base = model["baseline"]
    intro = (
        f"`python bench/speed.py --modes int8 int8+ov --batches 1 8 --repeats "
        f"{report['repeats']}` ({cpu_machine(report)}; `bench/results/{name}`): full-size "
        f"BLIP-base, random weights, {report['tokens']} tokens a caption. The catalog's loop "
        f"(float32, one image per call) ran at {base['images_per_s']:.2f} images/s, "
        f"{base['latency_p50_s'] * 1000:.0f} ms an image; ratios are the median of each "
        "pass's ratio to the loop in the same pass."
    )
    rows = [
        f"| {CPU_MODES.get(r['dtype'], r['dtype'])} | {r['batch']} | "
        f"{r['images_per_s']:.2f}{span(r.get('images_per_s_runs'))} | "
        f"{r['ratio']:.2f}x{span(r.get('ratio_runs'))} | "
        f"{r['single_latency_p50_s'] * 1000:.0f} ms | {r['latency_ratio']:.2f}x |"
        for r in model["blipserve"]
    ]
    guard = report.get("quality_guard", {})
    after = ""
    if "int8+ov" in guard:
        after = (
            f"Quality guard in the same run (`demo`, {guard['scenes']} held-out scenes): "
            f"captions equal float32's for {guard['int8+ov']['same_as_float32']:.1%} (OpenVINO "
            f"int8) and {guard['int8']['same_as_float32']:.1%} (torch int8)."
        )
    columns = ["blipserve", "batch", "images/s", "x the loop", "one image", "x lower"]
    return table(intro, columns, rows, after)


@renderer("cpu-blip2")
def cpu_blip2(results: Path) -> str:
    name = "speed-cpu-blip2.json"
    report = load(results, name)
    model = speed_model(report, "blip2-opt-2.7b")
    base = model["baseline"]
    weights = model["weights_gib"]
    intro = (
        f"`python bench/speed.py --models blip2-opt-2.7b --modes int8 --batches 1 8 --no-guard` "
        f"({cpu_machine(report)}; `bench/results/{name}`): full-size BLIP-2 OPT-2.7b "
        f"({model['parameters'] / 1e9:.1f} B parameters, random weights), "
        f"{report['tokens']} tokens a caption, one pass (a second float32 copy for "
        "interleaved passes does not fit in 24 GB)."
    )
    loop = (
        f"| the catalog's loop (float32) | 1 | {base['images_per_s']:.3f} | 1.00x | "
        f"{base['latency_p50_s']:.1f} s | {model['float32_weights_gib']:.2f} GiB |"
    )
    rows = [
        f"| blipserve {r['dtype']} | {r['batch']} | {r['images_per_s']:.3f} | "
        f"{r['ratio']:.2f}x | {r['single_latency_p50_s']:.1f} s "
        f"({r['latency_ratio']:.2f}x lower) | {weights[r['dtype']]:.2f} GiB |"
        for r in model["blipserve"]
    ]
    peak = model["memory_at_end"]["peak_rss_gib"]
    columns = ["", "batch", "images/s", "x the loop", "one image", "weights"]
    after = f"Process peak (the float32 baseline included): {peak:.1f} GiB."
    return table(intro, columns, [loop, *rows], after)


ENCODERS = {
    "torch-int8": "torch, blipserve's int8 kernel",
    "ov-bf16": "OpenVINO bfloat16",
    "ov-int8-static": "OpenVINO static int8 (NNCF, project's recipe)",
    "ov-int8-dynamic": "OpenVINO dynamic int8",
    "ov-nncf-preset": "OpenVINO static int8 (NNCF's transformer preset)",
}


@renderer("cpu-encoder")
def cpu_encoder(results: Path) -> str:
    blip = load(results, "openvino-encoder-2.json")
    blip2 = load(results, "openvino-encoder-blip2.json")
    intro = (
        "`python bench/openvino_encoder.py` (BLIP-base's ViT, full size; "
        "`openvino-encoder-2.json`) and `--layout blip2-opt-2.7b` (ViT-g at its real width, "
        f"two layers; `openvino-encoder-blip2.json`); {cpu_machine(blip)}; ms per image, "
        "medians of interleaved passes; cosine: the worst of 8 photographs' features "
        "against float32."
    )
    rows = []
    for key, label in ENCODERS.items():
        a, b = blip["results"].get(key), blip2["results"].get(key)
        if a is None:
            continue
        right = (
            f"{b['median_ms']['1']:.0f} / {b['median_ms']['8']:.0f} | {b['cosine_worst']:.5f}"
            if b
            else "| "
        )
        rows.append(
            f"| {label} | {a['median_ms']['1']:.0f} / {a['median_ms']['8']:.0f} | "
            f"{a['cosine_worst']:.5f} | {right} |"
        )
    columns = ["vision encoder", "BLIP-base batch 1 / 8", "cosine", "ViT-g batch 1 / 8", "cosine"]
    return table(intro, columns, rows)


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


def server_levels(report: dict[str, Any], name: str) -> dict[int, dict[str, Any]]:
    server = next(s for s in report["servers"] if s["name"] == name)
    return {level["clients"]: level for level in server["levels"]}


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


@renderer("gpu")
def gpu(results: Path) -> str:
    name = "gpu-h200.json"
    r = load(results, name)
    names = {"blip-image-captioning-base": "BLIP-base", "blip2-opt-2.7b": "BLIP-2 OPT-2.7b"}
    intro = (
        f"`python bench/speed.py` on one {r['gpu']} (torch {r['machine']['torch']}; "
        f"`bench/results/{name}`): full-size architectures with random weights, "
        f"{r['tokens']} tokens a caption, base64 640x480 JPEGs through the engine; the "
        "catalog's float32 loop in the same process."
    )
    rows = []
    for m in r["models"]:
        label = f"{names.get(m['layout'], m['layout'])} ({m['parameters'] / 1e9:.2f} B)"
        b = m["baseline"]
        rows.append(
            f"| {label} | the catalog's loop, float32 | 1 | {b['images_per_s']:.1f} | 1.0x | "
            f"{b['latency_p50_s'] * 1000:.0f} ms |"
        )
        for x in m["blipserve"]:
            one = f"{x['single_latency_p50_s'] * 1000:.0f} ms" if x["batch"] == 1 else ""
            rows.append(
                f"| | blipserve {m['dtype']} | {x['batch']} | {x['images_per_s']:.1f} | "
                f"{x['ratio']:.1f}x | {one} |"
            )
    memory = ", ".join(
        f"{names.get(m['layout'], m['layout'])} {m['peak_gpu_memory_gib']:.1f} GiB"
        for m in r["models"]
    )
    guard = r["quality_guard"]
    after = (
        f"Peak GPU memory: {memory}. Quality guard (`demo`, {guard['scenes']} held-out "
        f"scenes): bfloat16 captions equal float32's for "
        f"{guard['bfloat16']['same_as_float32']:.1%}, float16's for "
        f"{guard['float16']['same_as_float32']:.1%}."
    )
    columns = ["model", "mode", "batch", "images/s", "x the loop", "one image"]
    return table(intro, columns, rows, after, left=2)


@renderer("gpu-cuda-graphs")
def gpu_cuda_graphs(results: Path) -> str:
    name = "gpu-h200-cuda-graphs-paired.json"
    r = load(results, name)
    model = speed_model(r, "blip2-opt-2.7b")
    intro = (
        f"`bench/speed.py --models blip2-opt-2.7b --static-cache --repeats {r['repeats']}` on "
        f"one {r['gpu']} (`bench/results/{name}`): eager and compiled back to back "
        f"{len(model['blipserve_static_cache'][0]['gain_runs'])} times per size; the gain "
        "is the median of the pairs' ratios."
    )
    rows = [
        f"| {x['batch']} | {x['eager_images_per_s']:.1f} | {x['images_per_s']:.1f} | "
        f"{x['gain']:.2f}x{span(x['gain_runs'])} | {x['wall_with_compile_s']:.0f} s |"
        for x in model["blipserve_static_cache"]
    ]
    sc = r["static_cache_guard"]
    after = (
        f"The catalog's loop: {model['baseline']['images_per_s']:.1f} images/s in the same "
        f"run. `demo-vqa` ({sc['dtype']}) says the same with and without `--cuda-graphs` for "
        f"{sc['same']:.1%} of {sc['rows']} captions and answers."
    )
    columns = [
        "batch",
        "bfloat16 (eager) images/s",
        "with `--cuda-graphs`",
        "gain (range)",
        "first call",
    ]
    return table(intro, columns, rows, after, left=0)


@renderer("headline")
def headline(results: Path) -> str:
    cpu = speed_model(load(results, "speed-cpu-openvino-int8.json"), "blip-image-captioning-base")
    best = max(cpu["blipserve"], key=lambda r: r["ratio"])
    blip2 = speed_model(load(results, "speed-cpu-blip2.json"), "blip2-opt-2.7b")
    blip2_best = max(blip2["blipserve"], key=lambda r: r["ratio"])
    batch = load(results, "batch-cpu-openvino.json")
    server = load(results, "server-cpu-openvino.json")
    top = max(server["levels"])
    base, ours = server_levels(server, "baseline")[top], server_levels(server, "blipserve")[top]
    graphs = speed_model(load(results, "gpu-h200-cuda-graphs-paired.json"), "blip2-opt-2.7b")
    fastest = max(graphs["blipserve_static_cache"], key=lambda r: r["images_per_s"])
    return (
        f"Against the catalog's per-image float32 loop on a 2-core CPU: BLIP-base "
        f"{best['ratio']:.1f}x the images/s at batch {best['batch']} and BLIP-2 OPT-2.7b "
        f"{blip2_best['ratio']:.1f}x at batch {blip2_best['batch']}; `blipserve batch` "
        f"{batch['ratio']:.1f}x; the server "
        f"{ours['images_per_s'] / base['images_per_s']:.1f}x at {top} clients. On one H200, "
        f"BLIP-2 OPT-2.7b {fastest['images_per_s']:.0f} images/s at batch {fastest['batch']}. "
        "How, and every table: [docs/performance.md](docs/performance.md)."
    )


def documents(root: Path) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def render(text: str, results: Path) -> tuple[str, list[str]]:
    """``text`` with every block re-rendered, and the names of the blocks that changed."""
    changed: list[str] = []

    def replace(match: re.Match[str]) -> str:
        name = match.group(2)
        if name not in RENDERERS:
            raise KeyError(f"no renderer for results block {name!r}")
        body = RENDERERS[name](results) + "\n"
        if body != match.group(3):
            changed.append(name)
        return match.group(1) + body + match.group(4)

    return BLOCK.sub(replace, text), changed


def stale(root: Path = ROOT, results: Path = RESULTS) -> list[str]:
    """``file: block`` for each block whose text differs from its results files."""
    out: list[str] = []
    for path in documents(root):
        _, changed = render(path.read_text(), results)
        out += [f"{path.relative_to(root)}: {name}" for name in changed]
    return out


def used(root: Path = ROOT) -> set[str]:
    """Names of the blocks the documents hold."""
    return {m.group(2) for p in documents(root) for m in BLOCK.finditer(p.read_text())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only say which blocks differ")
    args = parser.parse_args()
    if args.check:
        differ = stale()
        for line in differ:
            print(f"stale: {line}")
        sys.exit(1 if differ else 0)
    for path in documents(ROOT):
        text, changed = render(path.read_text(), RESULTS)
        if changed:
            path.write_text(text)
            print(f"{path.relative_to(ROOT)}: rewrote {', '.join(changed)}")


if __name__ == "__main__":
    main()
