"""bench/speed.py's report as markdown: images/s, ratios to the baseline, achieved GFLOP/s
against the measured ceilings, memory, and the quality guards."""

from __future__ import annotations

from typing import Any


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    where = (
        report.get("gpu") or f"{m['cpu']}, {m['usable_cores']} cores, {m['torch_threads']} threads"
    )
    peak = report["matmul_tflops"]
    top = max(peak.values())  # (bf16's, where the hardware has it; else float32's)
    lines = [
        f"{where}; torch {m['torch']}, transformers {m['transformers']}; {report['tokens']} "
        "tokens per caption; random weights with the published configs.",
        f"Measured matmul ceilings: bf16 {peak['bfloat16'] * 1000:.0f} GFLOP/s, fp32 "
        f"{peak['float32'] * 1000:.0f} GFLOP/s. Images/s: median of {report.get('repeats', 1)} "
        "interleaved passes (range); x baseline: median of each pass's ratio to the baseline "
        "of the same pass (range); one image: p50 latency of one row, and how many times "
        "lower than the baseline's (median of the passes' ratios).",
        "",
        "| model | mode | batch | images/s | x baseline | one image | GFLOP/s | of peak |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]

    def row(
        model: dict[str, Any],
        mode: str,
        batch: int,
        rate: float,
        ratio: float,
        lat: float,
        runs: list[float] | None = None,
        ratios: list[float] | None = None,
        lat_ratio: float | None = None,
    ) -> str:
        achieved = rate * model["flops_per_image"] / 1e9
        share = achieved / (top * 1000)

        def spread(values: list[float] | None) -> str:
            return f" ({min(values):.2f}-{max(values):.2f})" if values and len(values) > 1 else ""

        lower = f" ({lat_ratio:.2f}x lower)" if lat_ratio else ""
        return (
            f"| {model['layout']} | {mode} | {batch} | {rate:.2f}{spread(runs)} | "
            f"{ratio:.2f}{spread(ratios)} | {lat * 1000:.0f} ms{lower} | {achieved:.0f} | "
            f"{share:.1%} |"
        )

    for model in report["models"]:
        if "error" in model:
            lines.append(f"| {model['layout']} | failed: {model['error'][:80]} | | | | | | |")
            continue
        b = model["baseline"]
        lines.append(
            row(
                model,
                "baseline (float32, one per call)",
                1,
                b["images_per_s"],
                1.0,
                b["latency_p50_s"],
                b.get("images_per_s_runs"),
            )
        )
        for r in model["blipserve"]:
            lines.append(
                row(
                    model,
                    f"blipserve {r['dtype']}",
                    r["batch"],
                    r["images_per_s"],
                    r["ratio"],
                    r["single_latency_p50_s"],
                    r.get("images_per_s_runs"),
                    r.get("ratio_runs"),
                    r.get("latency_ratio"),
                )
            )
        for r in model.get("blipserve_static_cache", []):
            same = f", same text as eager {r['same_as_eager']:.0%}" if "same_as_eager" in r else ""
            gain = ""
            if "gain" in r:
                lo, hi = min(r["gain_runs"]), max(r["gain_runs"])
                gain = (
                    f", {r['gain']:.2f}x ({lo:.2f}-{hi:.2f}) eager's "
                    f"{r['eager_images_per_s']:.1f} images/s and "
                    f"{r['eager_latency_p50_s'] * 1000:.0f} ms in the same passes"
                )
            mode = f"blipserve {model['dtype']} + static cache{same}{gain}"
            lines.append(
                row(
                    model,
                    mode,
                    r["batch"],
                    r["images_per_s"],
                    r["ratio"],
                    r["single_latency_p50_s"],
                    r.get("images_per_s_runs"),
                )
            )
        memory = ""
        if "weights_gib" in model:
            modes = ", ".join(f"{k} {v:.2f}" for k, v in model["weights_gib"].items())
            # (not ``peak``: row() reads the matmul ceilings under that name)
            rss = model.get("memory_at_end", {}).get("peak_rss_gib")
            memory = f"; weights GiB: float32 {model['float32_weights_gib']:.2f}, {modes}" + (
                f"; process peak {rss:.1f} GiB" if rss else ""
            )
        lines.append(
            f"({model['layout']}: {model['flops_per_image'] / 1e9:.1f} GFLOP per caption{memory})"
        )
    guard = report.get("quality_guard", {})
    if "scenes" in guard:
        parts = [
            f"{k}: exact {v['exact']:.1%}, same as fp32 {v['same_as_float32']:.1%}"
            for k, v in guard.items()
            if isinstance(v, dict)
        ]
        lines += ["", f"demo quality guard on {guard['scenes']} scenes — " + "; ".join(parts)]
    for key in sorted(k for k in report if k.startswith("static_cache_guard")):
        sc = report[key]
        if "same" not in sc:
            continue
        what = "captions and answers" if sc.get("model", "demo-vqa") == "demo-vqa" else "captions"
        lines += [
            "",
            f"{sc.get('model', 'demo-vqa')} ({sc['dtype']}, {sc['rows']} {what} of {sc['scenes']} "
            f"scenes) with --cuda-graphs says what it says without for {sc['same']:.1%} of "
            f"rows; exact {sc['cuda_graphs']['exact']:.1%} vs {sc['eager']['exact']:.1%}; "
            f"passes {sc['cuda_graphs']['first_pass_s']:.0f} s then "
            f"{sc['cuda_graphs']['second_pass_s']:.1f} s vs {sc['eager']['first_pass_s']:.0f} s "
            f"then {sc['eager']['second_pass_s']:.1f} s",
        ]
    return "\n".join(lines)
