"""Every benchmark in bench/ run in its quickest mode, so that none can rot unnoticed.

Each runs as a user runs it (``python bench/NAME.py ...``, a subprocess) with tiny models
and a few seconds of load, writes its JSON report to the test's folder, and the report must
hold what bench/docs_tables.py and the docs read, with finite positive numbers where a
measurement belongs.  The figures themselves mean nothing at this size.

The benchmarks cache models and photos under ``~/.cache``: here ``HOME`` and
``XDG_CACHE_HOME`` are the test's own folder, so nothing outside it is written.  A
benchmark that needs a package this machine lacks (OpenVINO, Ray Serve) is skipped, except
in CI, where that is a failure.  bench/baseline_server.py runs inside bench/server.py's
test; bench/docs_tables.py has its own (tests/unit/test_docs_tables.py).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.heavy

BENCH = Path(__file__).resolve().parents[2] / "bench"
TIMEOUT_S = 300


def needs(*modules: str) -> None:
    """Skip (fail in CI) unless every one of ``modules`` can be imported."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        why = f"needs {', '.join(missing)}"
        if os.environ.get("CI"):
            pytest.fail(f"{why}, which CI installs")
        pytest.skip(why)


def run_bench(tmp_path: Path, script: str, *args: str) -> dict[str, Any]:
    """``python bench/SCRIPT ARGS --out FILE``; its JSON report."""
    out = tmp_path / "report.json"
    home = tmp_path / "home"
    home.mkdir()
    env = {
        **os.environ,
        "HOME": str(home),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "HF_HUB_OFFLINE": "1",
    }
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), *args, "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=TIMEOUT_S,
    )
    assert proc.returncode == 0, f"{script} exited {proc.returncode}:\n{proc.stderr[-6000:]}"
    report: dict[str, Any] = json.loads(out.read_text())
    return report


def positive(*values: Any) -> None:
    for value in values:
        assert isinstance(value, int | float), value
        assert math.isfinite(value), value
        assert value > 0, value


def test_speed(tmp_path: Path) -> None:
    # (+ov: the vision encoder on OpenVINO, where it is installed)
    ov = importlib.util.find_spec("openvino") is not None
    modes = ("int8", "bfloat16+ov" if ov else "bfloat16")
    report = run_bench(
        tmp_path,
        "speed.py",
        *("--quick", "--models", "blip-image-captioning-base", "--tokens", "4"),
        *("--modes", *modes, "--batches", "1", "2"),
        *("--min-images", "2", "--baseline-images", "2", "--guard-scenes", "2"),
    )
    positive(report["matmul_tflops"]["bfloat16"], report["matmul_tflops"]["float32"])
    assert report["machine"]["usable_cores"] >= 1
    (model,) = report["models"]
    assert "error" not in model, model
    positive(model["parameters"], model["flops_per_image"], model["float32_weights_gib"])
    positive(model["baseline"]["images_per_s"], model["baseline"]["latency_p50_s"])
    runs = {(r["dtype"], r["batch"]): r for r in model["blipserve"]}
    assert set(runs) == {(m, b) for m in modes for b in (1, 2)}
    for r in runs.values():
        positive(r["images_per_s"], r["single_latency_p50_s"], r["ratio"], r["latency_ratio"])
    positive(*model["weights_gib"].values())
    positive(model["image_decoding_ms"])
    # where the time went, stage by stage: 4 tokens are a first step and 3 more a caption
    for r in runs.values():
        stages = r["stages"]
        positive(stages["vision_ms"], stages["first_step_ms"], stages["steps_ms"])
        positive(stages["pixels_ms"], stages["wall_ms"])
        assert stages["steps_count"] == 3 * stages["generate_calls"] > 0, stages
        assert math.isfinite(stages["generate_overhead_ms"]), stages
        assert stages["model_threads"] >= 1
        if stages["model_threads"] == 1:  # (else the stages are overlapping thread time)
            assert math.isfinite(stages["engine_ms"]), stages
    # each mode as build_model built it: int8's layers on an int8 kernel
    int8_steps = {step["step"]: step for step in model["build"]["int8"]}
    assert int8_steps["int8 linears"]["applied"], int8_steps
    assert "int8 kernel" in int8_steps["int8 linears"]["runs_on"]
    if ov:
        assert model["build"]["bfloat16+ov"][0]["step"] == "vision encoder on OpenVINO"
    # the quality guard: the demo model per dtype on held-out scenes, against float32
    guard = report["quality_guard"]
    assert guard["scenes"] == 2, guard
    dtypes = {"float32", "bfloat16", "int8"} | ({"int8+ov", "bfloat16+ov"} if ov else set())
    assert set(guard) == {"scenes", *dtypes}, guard
    assert guard["float32"]["same_as_float32"] == 1.0
    for mode, scores in guard.items():
        if mode != "scenes":
            assert 0 <= scores["exact"] <= 1, mode
            assert 0 <= scores["same_as_float32"] <= 1, mode


def test_server(tmp_path: Path) -> None:
    report = run_bench(
        tmp_path,
        "server.py",
        *("--quick", "--cache-dir", str(tmp_path / "models"), "--levels", "1,2"),
        *("--duration", "1", "--images", "2", "--tokens", "4"),
    )
    assert [s["name"] for s in report["servers"]] == ["baseline", "blipserve"]
    for server in report["servers"]:
        positive(server["startup_s"])
        assert [lv["clients"] for lv in server["levels"]] == [1, 2]
        for level in server["levels"]:
            assert level["errors"] == 0, level["first_error"]
            positive(level["requests"], level["images_per_s"], level["p50_s"], level["p95_s"])
    assert report["servers"][0]["dtype"] == "float32"
    positive(report["servers"][1]["levels"][0]["mean_batch_size"])
    # where blipserve's requests spent their time, from its /metrics (the baseline has none)
    assert all(level["stages"] is None for level in report["servers"][0]["levels"])
    for level in report["servers"][1]["levels"]:
        stages = level["stages"]
        positive(stages["model_s_per_batch"], stages["model_s_per_image"])
        positive(stages["decode_s_per_request"], stages["server_request_s"])
        assert stages["queue_wait_s_per_row"] >= 0
        assert stages["server_request_s"] <= level["level_wall_s"]
    assert [r["clients"] for r in report["comparison"]] == [1, 2]
    for row in report["comparison"]:
        positive(row["throughput_ratio"], row["p50_latency_ratio"])
    assert [t["target"].split(":")[0] for t in report["targets"]] == ["1 client"]
    positive(report["model"]["parameters"])


def test_jobs_online(tmp_path: Path) -> None:
    report = run_bench(
        tmp_path,
        "jobs_online.py",
        *("--quick", "--repeats", "1", "--duration", "3", "--settle", "0.5"),
        *("--warmup", "1", "--calibrate", "2", "--images", "2", "--tokens", "4"),
        # rows journaled one by one, and half the model's time for the job: its counts
        # move within a window of seconds (by default a chunk takes longer than that)
        *("--job-images", "400", "--chunk-rows", "1", "--blipserve-args", "--jobs-share 0.5"),
    )
    positive(report["single_latency_s"], report["single_model_s"], report["rate_per_s"])
    no_job, job = report["windows"]
    assert (no_job["condition"], job["condition"]) == ("no job", "job")
    for window in (no_job, job):
        assert window["errors"] == 0, window["error_examples"]
        positive(window["answered"], window["p50_s"], window["server_cpu_cores"])
    assert no_job["job"] is None
    # (on a loaded machine a window of seconds may close before the job's first row is
    # journaled: its counts are checked for presence, not progress)
    assert job["job"]["rows"] >= 0
    assert job["job"]["rows_per_s"] >= 0
    assert job["job"]["final"]["status"] in ("Canceled", "Completed"), job["job"]["final"]
    summary = report["summary"]
    assert set(summary["conditions"]) == {"no job", "job"}
    positive(summary["ratios"]["p50 job / no job"]["of_medians"])
    assert isinstance(summary["target"]["job_progressed_in_every_window"], bool)
    assert report["markdown"].startswith("## /score latency with and without a batch job")


def test_ray_serve(tmp_path: Path) -> None:
    needs("ray.serve")
    # one replica only: a local Ray cluster's start is most of the time (bench/server.py's
    # test runs the plain server under the same load)
    report = run_bench(
        tmp_path,
        "ray_serve.py",
        *("--quick", "--setups", "ray-1", "--clients", "2", "--duration", "1"),
        *("--images", "2", "--tokens", "4", "--start-timeout", "240"),
    )
    assert report["setups"] == ["ray-1"]
    ((setup, result),) = report["rounds"][0].items()
    assert setup == "ray-1"
    (level,) = result["levels"]
    assert level["errors"] == 0, level["first_error"]
    positive(level["images_per_s"], level["p50_s"], report["parameters"])
    positive(report["summary"]["median_images_per_s"]["ray-1"])
    assert report["markdown"].startswith("## blipserve serve --ray")


def test_batch(tmp_path: Path) -> None:
    report = run_bench(
        tmp_path,
        "batch.py",
        *("--quick", "--images", "4", "--size", "64x48", "--tokens", "4"),
    )
    positive(report["loop"]["images_per_s"], report["blipserve"]["images_per_s"])
    assert report["blipserve"]["done"] == 4
    positive(report["ratio"])
    stages = report["stages"]
    positive(stages["batch"], stages["blipserve_decode_s"], stages["vision_s"])
    positive(stages["loop_decode_and_preprocess_s"])
    assert math.isfinite(stages["text_s"])


def test_pipeline(tmp_path: Path) -> None:
    report = run_bench(
        tmp_path,
        "pipeline.py",
        *("--images", "16", "--size", "64x48", "--model-ms", "5", "--chunk", "4"),
        *("--repeats", "1", "--models", "sleep"),
    )
    results = {r["variant"]: r for r in report["results"]}
    assert set(results) == {"default", "commit-inline", "decode-processes"}
    for result in results.values():
        positive(result["images_per_s"], *result["busy_runs"])
    positive(results["commit-inline"]["ratio"], results["decode-processes"]["ratio"])


def test_openvino_encoder(tmp_path: Path) -> None:
    needs("openvino", "nncf")
    report = run_bench(
        tmp_path,
        "openvino_encoder.py",
        *("--quick", "--modes", "torch-int8", "ov-bf16", "--repeats", "1"),
    )
    assert set(report["results"]) == {"torch-int8", "ov-bf16"}
    for result in report["results"].values():
        assert -1 <= result["cosine_worst"] <= 1
        positive(*result["median_ms"].values())


def test_openvino_decoder(tmp_path: Path) -> None:
    needs("openvino", "nncf")
    report = run_bench(
        tmp_path, "openvino_decoder.py", "--quick", "--repeats", "1", "--tokens", "4"
    )
    assert all(report["checks"].values()), report["checks"]
    assert set(report["median_ms_per_image"]) == {"torch-int8", "ov-f32", "ov-int8"}
    for medians in report["median_ms_per_image"].values():
        positive(medians["1"], medians["8"])


def test_openvino_decoder_steps(tmp_path: Path) -> None:
    needs("openvino", "nncf")
    report = run_bench(tmp_path, "openvino_decoder.py", "--quick", "--steps", "--repeats", "1")
    assert "torch-int8" in report["median_ms_per_step"]
    assert "ov-int4-dynamic" in report["median_ms_per_step"]  # (groups fit --quick's width)
    positive(*report["median_ms_per_step"].values())


def test_draft_decode(tmp_path: Path) -> None:
    report = run_bench(tmp_path, "draft_decode.py", "--repeat", "1", "--size", "640x480")
    assert len(report["rows"]) == 10  # five photos, with and without noise
    for row in report["rows"]:
        positive(row["jpeg_bytes"], row["full_ms"], row["draft_ms"])
    positive(report["mean_speedup"])


def test_draft_guard(tmp_path: Path) -> None:
    report = run_bench(tmp_path, "draft_guard.py", "--quick")
    assert {r["layout"] for r in report["rows"]} == {"blip2-opt-2.7b", "blip-image-captioning-base"}
    for row in report["rows"]:
        assert 0.9 < row["worst_cosine"] <= 1.0 + 1e-9, row
        positive(row["draft_decode_ms"], row["full_decode_ms"])


def test_decode_step(tmp_path: Path) -> None:
    report = run_bench(tmp_path, "decode_step.py", "--quick", "--repeats", "1", "--rows", "1", "2")
    positive(report["bandwidth_gb_s"], report["decoder_weight_bytes"], report["weights_read_ms"])
    results = {(r["variant"], r["rows"]): r for r in report["results"]}
    variants = list(report["build"])
    assert set(results) == {(v, n) for v in variants for n in (1, 2)}
    for r in results.values():
        assert len(r["step_ms_runs"]) == 1
        assert math.isfinite(r["step_ms"])  # (a difference of two timings: may be noise)
    # The second variant leaves out the bf16 keys and values, which only CPUs with native
    # bf16 get: elsewhere int8 alone is measured.
    from blipserve.models.precision import cpu_has_native_bf16

    assert len(variants) == (2 if cpu_has_native_bf16() else 1)
    if len(variants) == 2:
        steps = {s["step"]: s for s in report["build"][variants[1]]}
        left_out = steps["bf16 image keys and values"]
        assert (left_out["applied"], left_out["why"]) == (False, "--disable-speedup")


def test_score(tmp_path: Path) -> None:
    report = run_bench(
        tmp_path, "score.py", "--quick", "--images", "3", "--loop-images", "1", "--repeats", "1"
    )
    [single_pass] = report["passes"]
    positive(
        single_pass["loop_ms"], single_pass["engine_ms"], *single_pass["score_whole_s"].values()
    )
    assert set(single_pass["score_whole_s"]) == {"3", "1"}
    assert report["engine"]["max_batch_size"] > 0
    # (score_ms is a difference of two whole-process timings: at this size, noise)
    assert math.isfinite(report["summary"]["score_x_loop"]["median"])


def test_load_memory(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoint"
    report = run_bench(
        tmp_path,
        "load_memory.py",
        *("--folder", str(folder), "--layout", "blip-image-captioning-base", "--layers", "1,1"),
        *("--modes", "int8", "--repeats", "1"),
    )
    assert (folder / "config.json").exists()
    positive(report["checkpoint"]["safetensors_gib"])
    assert set(report["first_loads"]) == {"this int8"}
    result = report["results"]["this int8"]
    assert result["runs"] == 1
    for key in ("load_s", "weights_gib", "peak_anon_gib", "peak_rss_gib", "end_rss_gib"):
        positive(result[key]["median"])
    # the build let the checkpoint's file go
    assert result["checkpoint_mapped_runs"] == 0
    assert not report["first_loads"]["this int8"]["checkpoint_mapped"]
