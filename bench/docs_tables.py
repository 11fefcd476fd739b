"""The docs' measured numbers, rendered from the committed results files.

Every table (and the README's headline) of measured numbers in ``README.md`` and
``docs/*.md`` sits between ``<!-- results: NAME -->`` and ``<!-- /results -->``, and is
exactly what NAME's renderer makes of files in ``bench/results`` (the model-speed tables'
in ``docs_tables_speed.py``, the entry points' under load in ``docs_tables_serving.py``,
the headline here).  A new run of a benchmark writes its JSON; this script then rewrites
the blocks:

    python bench/docs_tables.py            # rewrite every block from the results files
    python bench/docs_tables.py --check    # exit 1 naming each block that differs

``tests/unit/test_docs_tables.py`` runs the check, so a results file and the text quoting
it cannot drift apart.  Dated runs and their caveats live in ``bench/results/HISTORY.md``.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package

import docs_tables_serving  # noqa: F401  (registers its renderers)
import docs_tables_speed  # noqa: F401  (registers its renderers)
from docs_tables_base import RENDERERS, load, renderer, server_levels, speed_model

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
BLOCK = re.compile(r"(<!-- results: ([\w-]+) -->\n)(.*?)(<!-- /results -->)", re.DOTALL)


@renderer("headline")
def headline(results: Path) -> str:
    cpu_report = load(results, "speed-cpu-openvino-int8.json")
    cpu = speed_model(cpu_report, "blip-image-captioning-base")
    best = max(cpu["blipserve"], key=lambda r: r["ratio"])
    blip2_report = load(results, "speed-cpu-blip2.json")
    blip2 = speed_model(blip2_report, "blip2-opt-2.7b")
    blip2_best = max(blip2["blipserve"], key=lambda r: r["ratio"])
    batch = load(results, "batch-cpu-openvino.json")
    server = load(results, "server-cpu-openvino.json")
    top = max(server["levels"])
    base, ours = server_levels(server, "baseline")[top], server_levels(server, "blipserve")[top]
    graphs = speed_model(load(results, "gpu-h200-cuda-graphs-paired.json"), "blip2-opt-2.7b")
    fastest = max(graphs["blipserve_static_cache"], key=lambda r: r["images_per_s"])

    def on(report: dict[str, Any]) -> str:  # (the files were measured on different CPUs)
        name: str = report["machine"]["cpu"]
        return name.replace("(R)", "").replace(" Processor", "").strip()

    return (
        f"Against the catalog's per-image float32 loop on a 2-core CPU: BLIP-base "
        f"{best['ratio']:.1f}x the images/s at batch {best['batch']} ({on(cpu_report)}) and "
        f"BLIP-2 OPT-2.7b {blip2_best['ratio']:.1f}x at batch {blip2_best['batch']} "
        f"({on(blip2_report)}); `blipserve batch` {batch['ratio']:.1f}x ({on(batch)}); the "
        f"server {ours['images_per_s'] / base['images_per_s']:.1f}x at {top} clients "
        f"({on(server)}; each ratio from one run on one machine). On one H200, "
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
