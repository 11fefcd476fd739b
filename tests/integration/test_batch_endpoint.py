"""The catalog's batch endpoint on a real server: jobs started, polled and canceled over
HTTP the way the catalog's REST sample does it (``requests``-style JSON posts, the job's
``id`` polled until ``properties.status`` ends), on local folders and on object-store
emulators (Azurite, moto's S3), through SIGKILL and restarts."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest

from helpers import (
    batch_command,
    client_base64,
    jpeg_bytes,
    photos,
    score_body,
    write_files,
)
from stores import Emulator
from testkit.env import RAY_ENV
from testkit.live_server import RunningServer

KEY = "batch-key"
AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
PARAMS = {"max_new_tokens": 4}


def invoke(server: RunningServer, inputs: str, output: str | None = None, **ours: Any) -> Any:
    """POST /jobs as the catalog's REST sample does (a JSON string, the key as a bearer)."""
    props: dict[str, Any] = {"InputData": {"data": {"JobInputType": "UriFolder", "Uri": inputs}}}
    if output is not None:
        props["OutputData"] = {"score": {"JobOutputType": "UriFile", "Uri": output}}
    props["blipserve"] = {"params": PARAMS, **ours}
    return httpx.post(
        f"{server.url}/jobs", content=json.dumps({"properties": props}), headers=AUTH, timeout=60
    )


def poll(server: RunningServer, job_id: str, timeout: float = 240) -> dict[str, Any]:
    """GET /jobs/{id} until its status ends (the sample's loop, without its minutes)."""
    deadline = time.monotonic() + timeout
    while True:
        job: dict[str, Any] = httpx.get(
            f"{server.url}/jobs/{job_id}", headers=AUTH, timeout=30
        ).json()
        if job["properties"]["status"] in ("Completed", "Failed", "Canceled"):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.2)


def wait_rows(server: RunningServer, job_id: str, rows: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        job = httpx.get(f"{server.url}/jobs/{job_id}", headers=AUTH, timeout=30).json()
        if job["properties"]["progress"]["rowsDone"] >= rows:
            return
        assert job["properties"]["status"] not in ("Completed", "Failed", "Canceled"), job
        assert time.monotonic() < deadline, job
        time.sleep(0.1)


@pytest.fixture
def serve(
    server_factory: Callable[..., RunningServer],
) -> Callable[..., RunningServer]:
    """``serve(model, jobs, *roots, flags=())``: a ready server hosting jobs in ``jobs``."""

    def start(model: Path, jobs: Path, *roots: str, flags: tuple[str, ...] = ()) -> RunningServer:
        args = ["--api-key", KEY, "--jobs-dir", str(jobs)]
        for root in roots:
            args += ["--jobs-allow-root", root]
        return server_factory(model, *args, *flags)

    return start


def catalog_tables() -> dict[str, bytes]:
    """The catalog's batch input: pandas CSVs of base64 photos (line breaks and all)."""
    cells = [client_base64(jpeg_bytes(img)) for img in photos().values()]
    return {
        "part-0.csv": pd.DataFrame({"image": cells[:4]}).to_csv().encode(),
        "part-1.csv": pd.DataFrame({"image": [*cells[4:], "not an image"]}, index=[7, 8, 9])
        .to_csv()
        .encode(),
    }


def reference(model: Path, inputs: Path, out: Path, env: dict[str, str] | None = None) -> bytes:
    """What ``blipserve batch`` writes for the same input."""
    done = subprocess.run(
        batch_command(model, inputs, out),
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {}), "HF_HUB_OFFLINE": "1"},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return out.read_bytes()


def slow_inputs(folder: Path, count: int) -> Path:
    """``count`` photos (crops of the samples, 640x480-ish JPEGs) in a folder."""
    samples = [jpeg_bytes(img) for img in photos().values()]
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (folder / f"{i:04d}.jpg").write_bytes(samples[i % len(samples)])
    return folder


def output_ids(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text().splitlines()]


# -- on a local folder ------------------------------------------------------------------------


def test_the_catalogs_flow_writes_what_blipserve_batch_writes(
    tiny_model_dir: dict[str, Path], tmp_path: Path, serve: Callable[..., RunningServer]
) -> None:
    model = tiny_model_dir["blip-caption"]
    data = write_files(tmp_path / "data" / "in", catalog_tables()).parent
    expected = reference(model, data / "in", tmp_path / "reference" / "predictions.csv")
    server = serve(model, tmp_path / "jobs", str(data))

    answer = invoke(server, str(data / "in"), str(data / "out" / "predictions.csv"))
    assert answer.status_code == 202, answer.text
    job = answer.json()
    assert job["id"] == job["name"]
    assert job["properties"]["status"] == "Queued"
    done = poll(server, job["id"])
    assert done["properties"]["status"] == "Completed", done
    progress = done["properties"]["progress"]
    assert (progress["rowsDone"], progress["rowsFailed"]) == (6, 1)
    assert (data / "out" / "predictions.csv").read_bytes() == expected
    rows = list(csv.reader(io.StringIO(expected.decode())))
    assert [r[0] for r in rows] == ["0", "1", "2", "3", "7", "8", "9"]

    # the same output again: refused (no job overwrites another's results)
    again = invoke(server, str(data / "in"), str(data / "out" / "predictions.csv"))
    assert again.status_code == 409
    assert "exists already" in again.json()["message"]
    # the list, newest first; the key is needed everywhere
    listed = httpx.get(f"{server.url}/jobs", headers=AUTH).json()
    assert [j["name"] for j in listed["value"]] == [job["name"]]
    assert httpx.get(f"{server.url}/jobs").status_code == 401
    assert httpx.post(f"{server.url}/jobs", json={}).status_code == 401
    assert server.metric('blipserve_jobs{status="Completed"}', AUTH) == 1
    assert server.metric('blipserve_jobs{status="Running"}', AUTH) == 0


def test_bad_bodies_are_4xx_naming_the_field(
    tiny_model_dir: dict[str, Path], tmp_path: Path, serve: Callable[..., RunningServer]
) -> None:
    data = write_files(tmp_path / "data" / "in", catalog_tables()).parent
    server = serve(tiny_model_dir["blip-caption"], tmp_path / "jobs", str(data))
    folder = {"JobInputType": "UriFolder", "Uri": str(data / "in")}
    cases: list[tuple[Any, int, str]] = [
        ({"InputData": {"a": folder}}, 400, "properties: required"),
        ({"properties": {"InputData": {"a": folder, "b": folder}}}, 400, "exactly one"),
        (
            {"properties": {"InputData": {"a": {"JobInputType": "Literal", "Uri": "x"}}}},
            400,
            "properties.InputData.a.JobInputType",
        ),
        (
            {"properties": {"InputData": {"a": {"JobInputType": "UriFolder", "Uri": "/etc"}}}},
            403,
            "'/etc' is outside the folders",
        ),
        (
            {"properties": {"InputData": {"a": {**folder, "Uri": str(data / "nope")}}}},
            400,
            "properties.InputData.Uri: input",
        ),
        (
            {"properties": {"InputData": {"a": {**folder, "Uri": "az://nostore/in"}}}},
            403,
            "outside the folders",
        ),
    ]
    for body, status, says in cases:
        answer = httpx.post(f"{server.url}/jobs", json=body, headers=AUTH)
        assert answer.status_code == status, (body, answer.text)
        assert says in answer.json()["message"], answer.text
    assert httpx.get(f"{server.url}/jobs/batchjob-nope", headers=AUTH).status_code == 404
    assert httpx.get(f"{server.url}/jobs?top=0", headers=AUTH).status_code == 400
    assert httpx.get(f"{server.url}/ready").status_code == 200  # (still serving)


def test_sigkill_mid_job_then_restart_answers_every_row_once(
    controllable_model: Path, tmp_path: Path, serve: Callable[..., RunningServer]
) -> None:
    data = tmp_path / "data"
    slow_inputs(data / "in", 120)
    out = data / "out.jsonl"
    flags = ("--chunk-rows", "4", "--max-batch-size", "4")
    jobs = tmp_path / "jobs"
    server = serve(controllable_model, jobs, str(data), flags=flags)
    job = invoke(server, str(data / "in"), str(out), prompt="sleep:0.05").json()
    wait_rows(server, job["id"], 8)
    server.stop(signal.SIGKILL)

    again = serve(controllable_model, jobs, str(data), flags=flags)
    done = poll(again, job["id"])
    assert done["properties"]["status"] == "Completed", done
    assert done["properties"]["attempts"] == 2
    assert done["properties"]["progress"]["rowsSkipped"] >= 8  # (done before the kill)
    ids = output_ids(out)
    assert len(ids) == len(set(ids)) == 120


def test_cancel_then_a_new_job_on_the_same_output_resumes_and_requests_are_answered(
    controllable_model: Path, tmp_path: Path, serve: Callable[..., RunningServer]
) -> None:
    data = tmp_path / "data"
    slow_inputs(data / "in", 80)
    out = data / "out.jsonl"
    server = serve(
        controllable_model,
        tmp_path / "jobs",
        str(data),
        flags=("--chunk-rows", "4", "--max-batch-size", "4"),
    )
    image = client_base64(jpeg_bytes(photos()["coffee"]))
    body = score_body([[image]], max_new_tokens=4)
    alone = httpx.post(f"{server.url}/score", json=body, headers=AUTH, timeout=60).json()

    job = invoke(server, str(data / "in"), str(out), prompt="sleep:0.05").json()
    wait_rows(server, job["id"], 4)
    answers: list[httpx.Response] = []

    def online() -> None:  # requests while the job runs
        for _ in range(10):
            answers.append(httpx.post(f"{server.url}/score", json=body, headers=AUTH, timeout=60))

    thread = threading.Thread(target=online)
    thread.start()
    thread.join(120)
    assert [a.status_code for a in answers] == [200] * 10
    assert all(a.json() == alone for a in answers)  # true captions, as without a job

    canceled = httpx.post(f"{server.url}/jobs/{job['id']}/cancel", headers=AUTH).json()
    assert canceled["properties"]["status"] in ("CancelRequested", "Canceled")
    ended = poll(server, job["id"])
    assert ended["properties"]["status"] == "Canceled"
    first = ended["properties"]["progress"]["rowsDone"]
    assert 4 <= first < 80
    assert not out.exists()

    second = invoke(server, str(data / "in"), str(out), prompt="sleep:0.05").json()
    done = poll(server, second["id"])
    assert done["properties"]["status"] == "Completed", done
    assert done["properties"]["progress"]["rowsSkipped"] >= first
    ids = output_ids(out)
    assert len(ids) == len(set(ids)) == 80


# -- on object storage -----------------------------------------------------------------------


def test_the_catalogs_flow_on_object_storage(
    store: Emulator,
    tiny_model_dir: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    serve: Callable[..., RunningServer],
) -> None:
    """Inputs named the ways the catalog's clients name them: a blob URL (Azurite's
    path-style one) and azureml://datastores/...; predictions.csv read back from the
    store equals blipserve batch's on a local copy."""
    model = tiny_model_dir["blip-caption"]
    tables = catalog_tables()
    bucket = store.new_bucket()
    store.upload(f"{bucket}/in", tables)
    expected = reference(
        model,
        write_files(tmp_path / "local" / "in", tables),
        tmp_path / "local" / "predictions.csv",
    )
    for key, value in store.env.items():
        monkeypatch.setenv(key, value)
    server = serve(
        model,
        tmp_path / "jobs",
        bucket,
        flags=("--datastore", f"workspaceblobstore={bucket}"),
    )
    container = bucket.split("://", 1)[1]
    if store.kind == "azure":
        source = f"{store.endpoint}/devstoreaccount1/{container}/in"
    else:
        source = f"{bucket}/in"
    output = "azureml://datastores/workspaceblobstore/paths/out/predictions.csv"
    answer = invoke(server, source, output)
    assert answer.status_code == 202, answer.text
    done = poll(server, answer.json()["id"])
    assert done["properties"]["status"] == "Completed", done
    assert store.download(f"{bucket}/out/predictions.csv") == expected
    assert store.secret not in server.output()
    assert store.secret not in json.dumps(done)

    nowhere = invoke(server, f"{bucket}/nothing-here", None)
    assert nowhere.status_code == 400
    assert "properties.InputData.Uri" in nowhere.text


def test_a_store_that_fails_mid_job_fails_it_clearly_and_it_resumes(
    store: Emulator,
    controllable_model: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    serve: Callable[..., RunningServer],
) -> None:
    if store.kind == "s3":
        pytest.skip("moto's server keeps nothing across a restart: resuming is Azurite's part")
    bucket = store.new_bucket()
    sample = [jpeg_bytes(img) for img in photos().values()]
    store.upload(f"{bucket}/in", {f"{i:03d}.jpg": sample[i % 6] for i in range(60)})
    for key, value in store.env.items():
        monkeypatch.setenv(key, value)
    server = serve(
        controllable_model,
        tmp_path / "jobs",
        bucket,
        flags=("--chunk-rows", "4", "--max-batch-size", "4", "--job-retries", "0"),
    )
    out = f"{bucket}/out.jsonl"
    job = invoke(server, f"{bucket}/in", out, prompt="sleep:0.05").json()
    wait_rows(server, job["id"], 8)
    store.stop()
    try:
        failed = poll(server, job["id"])
    finally:
        store.start()
    assert failed["properties"]["status"] == "Failed", failed
    error = failed["properties"]["error"]
    assert error["code"] == "StorageError"
    assert bucket.split("://")[1] in error["message"]
    assert store.secret not in json.dumps(failed)
    again = invoke(server, f"{bucket}/in", out, prompt="sleep:0.05").json()
    done = poll(server, again["id"])
    assert done["properties"]["status"] == "Completed", done
    assert done["properties"]["progress"]["rowsSkipped"] >= 8
    rows = [json.loads(line) for line in store.download(out).decode().splitlines()]
    assert len({r["id"] for r in rows}) == len(rows) == 60


# -- on Ray ---------------------------------------------------------------------------------


def test_jobs_on_a_ray_cluster_write_what_blipserve_batch_writes(
    tiny_model_dir: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    serve: Callable[..., RunningServer],
) -> None:
    """``--jobs-on-ray local``: the server submits the job to a local Ray cluster it
    starts (Ray Data actors run the rows), tracks it, and the output is the same."""
    pytest.importorskip("ray")
    for key, value in RAY_ENV.items():
        monkeypatch.setenv(key, value)
    model = tiny_model_dir["blip-caption"]
    data = write_files(tmp_path / "data" / "in", catalog_tables()).parent
    expected = reference(model, data / "in", tmp_path / "reference" / "predictions.csv")
    server = serve(model, tmp_path / "jobs", str(data), flags=("--jobs-on-ray", "local"))
    answer = invoke(server, str(data / "in"), str(data / "out" / "predictions.csv"))
    assert answer.status_code == 202, answer.text
    done = poll(server, answer.json()["id"], timeout=400)
    assert done["properties"]["status"] == "Completed", done
    assert (
        done["properties"]["progress"]["rowsDone"],
        done["properties"]["progress"]["rowsFailed"],
    ) == (6, 1)
    assert (data / "out" / "predictions.csv").read_bytes() == expected


def test_a_tables_image_paths_stay_under_the_allowed_roots(
    tiny_model_dir: dict[str, Path], tmp_path: Path, serve: Callable[..., RunningServer]
) -> None:
    """A table may name image files anywhere; a hosted job reads only those under an
    allowed root: the others are failed rows, and nothing of them is read."""
    data, outside = tmp_path / "data", tmp_path / "private"
    (data / "in").mkdir(parents=True)
    outside.mkdir()
    photo = jpeg_bytes(photos()["chelsea"])
    (data / "in" / "inside.jpg").write_bytes(photo)
    (outside / "secret.jpg").write_bytes(photo)
    (data / "in" / "link.jpg").symlink_to(outside / "secret.jpg")
    table = (
        "image\ninside.jpg\n../../private/secret.jpg\n" + f"{outside / 'secret.jpg'}\nlink.jpg\n"
    )
    (data / "in" / "rows.csv").write_text(table)
    server = serve(tiny_model_dir["blip-caption"], tmp_path / "jobs", str(data))
    props = {
        "InputData": {"t": {"JobInputType": "UriFile", "Uri": str(data / "in" / "rows.csv")}},
        "OutputData": {"o": {"JobOutputType": "UriFile", "Uri": str(data / "out.jsonl")}},
    }
    answer = httpx.post(f"{server.url}/jobs", json={"properties": props}, headers=AUTH)
    assert answer.status_code == 202, answer.text
    done = poll(server, answer.json()["id"])
    assert done["properties"]["status"] == "Completed", done
    rows = [json.loads(line) for line in (data / "out.jsonl").read_text().splitlines()]
    assert [bool(r["error"]) for r in rows] == [False, True, True, True]
    for row in rows[1:]:
        assert "outside the folders this server lets jobs read" in row["error"], row


def test_summary_only_keeps_the_counts_and_writes_nothing_of_the_clients(
    tiny_model_dir: dict[str, Path], tmp_path: Path, serve: Callable[..., RunningServer]
) -> None:
    """The catalog's output_action summary_only, and a folder input whose table links out
    of the allowed root (a failed row: nothing of it is read)."""
    data = write_files(tmp_path / "data" / "in", catalog_tables()).parent
    outside = tmp_path / "private"
    outside.mkdir()
    (outside / "rows.csv").write_text("image\n/etc/hostname\n")
    (data / "in" / "zz-link.csv").symlink_to(outside / "rows.csv")
    server = serve(
        tiny_model_dir["blip-caption"],
        tmp_path / "jobs",
        str(data),
        flags=("--output-action", "summary_only"),
    )
    answer = invoke(server, str(data / "in"), str(data / "out" / "predictions.csv"))
    assert answer.status_code == 202, answer.text
    done = poll(server, answer.json()["id"])
    assert done["properties"]["status"] == "Completed", done
    progress = done["properties"]["progress"]
    assert (progress["rowsDone"], progress["rowsFailed"]) == (6, 2)  # (a bad cell, the link)
    assert done["properties"]["outputFile"] is None
    assert not (data / "out").exists()
