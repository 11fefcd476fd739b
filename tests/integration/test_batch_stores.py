"""Batch jobs on object storage, against emulators that speak the real protocols: Azurite
(Azure Blob) and moto's S3 server, each started on a loopback port by the ``store`` fixture.

The same jobs run on a local folder give the reference: a store changes where bytes live,
never the results.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from PIL import Image

from blipserve.batch.runner import BatchJob, BatchOptions, Summary
from blipserve.engine import Engine
from blipserve.params import GenerationParams
from helpers import (
    batch_command,
    client_base64,
    img2dataset_shards,
    jpeg_bytes,
    members,
    photos,
    write_files,
)
from live_server import LAUNCHER
from stores import Emulator

PARAMS = GenerationParams(max_new_tokens=4)


@pytest.fixture(scope="module")
def photo_files() -> dict[str, bytes]:
    """``name.jpg`` -> JPEG bytes: six photographs and crops of them (24 files)."""
    files: dict[str, bytes] = {}
    rng = random.Random(7)
    for name, img in photos().items():
        files[f"{name}.jpg"] = jpeg_bytes(img)
        for k in range(3):
            w, h = img.size
            x, y = rng.randrange(w // 2), rng.randrange(h // 2)
            files[f"crops/{name}-{k}.jpg"] = jpeg_bytes(img.crop((x, y, x + w // 2, y + h // 2)))
    return files


def upload(store: Emulator, url: str, files: dict[str, bytes]) -> None:
    store.upload(url, files)


def download(store: Emulator, url: str) -> bytes:
    return store.download(url)


def run(engine: Engine, store: Emulator | None = None, **kwargs: Any) -> Summary:
    options = BatchOptions(
        params=PARAMS,
        progress=False,
        chunk_rows=4,
        storage_options=store.storage_options if store else {},
        **kwargs,
    )
    return BatchJob(engine, options).run()


def jsonl(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in data.decode().splitlines()]


def cli(store: Emulator, *argv: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **store.env, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        list(argv), env=env, capture_output=True, text=True, timeout=300, check=False, **kwargs
    )


def test_catalog_layout_from_the_store_to_predictions_csv_in_the_store(
    store: Emulator, tiny_model_dir: dict[str, Path], tmp_path: Path
) -> None:
    """The catalog's batch inputs (a folder of pandas CSVs of base64 photos, with line
    breaks) read from the store, predictions.csv written there: the same file as a local
    run writes.  Credentials come from the environment, as the libraries read them."""
    cells = [client_base64(jpeg_bytes(img)) for img in photos().values()]
    tables = {
        "part-0.csv": pd.DataFrame({"image": cells[:4]}).to_csv().encode(),
        "part-1.csv": pd.DataFrame({"image": cells[4:]}, index=[7, 8]).to_csv().encode(),
    }
    bucket = store.new_bucket()
    upload(store, f"{bucket}/inputs", tables)
    local_inputs = write_files(tmp_path / "inputs", tables)
    model = tiny_model_dir["blip-caption"]

    reference = tmp_path / "predictions.csv"
    done = cli(store, *batch_command(model, local_inputs, reference))
    assert done.returncode == 0, done.stderr
    out = f"{bucket}/out/predictions.csv"
    done = cli(store, *batch_command(model, f"{bucket}/inputs/", out))
    assert done.returncode == 0, done.stderr
    assert "done 6, failed 0" in done.stderr
    assert download(store, out) == reference.read_bytes()
    rows = list(csv.reader(io.StringIO(reference.read_text())))
    assert [r[0] for r in rows] == ["0", "1", "2", "3", "7", "8"]
    assert store.secret not in done.stderr


def test_every_format_and_sidecars_in_the_store(
    store: Emulator, engine: Engine, photo_files: dict[str, bytes], tmp_path: Path
) -> None:
    bucket = store.new_bucket()
    images = f"{bucket}/photos"
    upload(store, images, photo_files)
    local_images = write_files(tmp_path / "photos", photo_files)
    run(engine, input=local_images, output=tmp_path / "ref.jsonl")
    want = [(r["id"], r["text"]) for r in jsonl((tmp_path / "ref.jsonl").read_bytes())]
    assert len(want) == len(photo_files)
    assert all(text for _, text in want)

    summary = run(engine, store, input=images, output=f"{bucket}/out/captions.jsonl")
    assert (summary.done, summary.failed) == (len(photo_files), 0)
    got = jsonl(download(store, f"{bucket}/out/captions.jsonl"))
    assert [(r["id"], r["text"]) for r in got] == want

    run(engine, store, input=images, output=f"{bucket}/out/captions.csv")
    table = pd.read_csv(io.BytesIO(download(store, f"{bucket}/out/captions.csv")))
    assert list(zip(table["id"], table["text"], strict=True)) == want
    run(engine, store, input=images, output=f"{bucket}/out/captions.parquet")
    table = pd.read_parquet(io.BytesIO(download(store, f"{bucket}/out/captions.parquet")))
    assert list(zip(table["id"], table["text"], strict=True)) == want

    # imagefolder metadata and caption files next to the images, in the store
    summary = run(engine, store, input=images, output=f"{images}/metadata.jsonl", sidecar=".txt")
    assert summary.failed == 0
    meta = jsonl(download(store, f"{images}/metadata.jsonl"))
    assert [(m["file_name"], m["text"]) for m in meta] == want
    for name, text in want:
        caption = download(store, f"{images}/{name.rsplit('.', 1)[0]}.txt").decode()
        assert caption == text + "\n"
    # rerun: nothing to do, and neither metadata.jsonl nor the captions became inputs
    summary = run(engine, store, input=images, output=f"{images}/metadata.jsonl", sidecar=".txt")
    assert (summary.done, summary.failed, summary.skipped) == (0, 0, len(photo_files))
    # the journal is a folder of parts beside the output, merged when the job resumed
    parts = store.filesystem().ls(f"{images.split('://')[1]}/.metadata.jsonl.journal")
    assert sorted(p.rsplit("/", 1)[1].split("-")[0] for p in parts) == ["part", "signature.json"]


def test_tables_in_the_store_name_images_relative_to_themselves(
    store: Emulator, engine: Engine, photo_files: dict[str, bytes]
) -> None:
    bucket = store.new_bucket()
    names = sorted(photo_files)[:5]
    upload(store, f"{bucket}/data", {n: photo_files[n] for n in names})
    table = pd.DataFrame({"image": [*names, "nope.jpg"], "text": ["a photo of"] * 6})
    upload(
        store,
        f"{bucket}/data",
        {"list.jsonl": table.to_json(orient="records", lines=True).encode()},
    )
    summary = run(engine, store, input=f"{bucket}/data/list.jsonl", output=f"{bucket}/o.jsonl")
    assert (summary.done, summary.failed) == (5, 1)
    records = jsonl(download(store, f"{bucket}/o.jsonl"))
    assert "image file not found" in records[-1]["error"]
    assert f"{bucket}/data/nope.jpg" in records[-1]["error"]


def slow_batch(model: Path, images: str, out: str, *flags: str) -> list[str]:
    """``blipserve batch`` through the tests' launcher, whose controllable model sleeps
    0.3 s per batch of rows with the text ``sleep:0.3``: a job that is surely still running
    when the test acts."""
    return [
        *(sys.executable, str(LAUNCHER), "batch", images, "-o", out, "--model", str(model)),
        *("--prompt", "sleep:0.3", "--chunk-rows", "2", "--no-progress", *flags),
    ]


def parts(fs: Any, journal: str) -> int:
    fs.invalidate_cache(journal)  # adlfs would answer from its cache
    try:
        return sum("part-" in p for p in fs.ls(journal))
    except FileNotFoundError:
        return 0


def wait_for_parts(fs: Any, journal: str, more_than: int, proc: subprocess.Popen[Any]) -> None:
    deadline = time.monotonic() + 120
    while parts(fs, journal) <= more_than and proc.poll() is None:
        assert time.monotonic() < deadline, "the job journaled nothing in 120 s"
        time.sleep(0.1)


def test_kills_and_resume_on_the_store_exactly_once(
    store: Emulator, controllable_model: Path, photo_files: dict[str, bytes]
) -> None:
    bucket = store.new_bucket()
    upload(store, f"{bucket}/photos", photo_files)
    upload(store, f"{bucket}/photos", {"zz-cut.jpg": photo_files["coffee.jpg"][:5000]})
    out = f"{bucket}/out.jsonl"
    argv = slow_batch(controllable_model, f"{bucket}/photos", out)
    env = {**os.environ, **store.env, "HF_HUB_OFFLINE": "1"}
    rng = random.Random(99)
    fs = store.filesystem()
    journal = f"{bucket}/.out.jsonl.journal".split("://")[1]
    for _ in range(3):
        before = parts(fs, journal)
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_parts(fs, journal, before, proc)
        time.sleep(rng.uniform(0, 0.6))  # anywhere in a chunk: reading, running, journaling
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    done = cli(store, *argv)
    assert done.returncode == 0, done.stderr
    rows = jsonl(download(store, out))
    assert sorted(r["id"] for r in rows) == sorted([*photo_files, "zz-cut.jpg"])
    assert [r["id"] for r in rows if r["error"]] == ["zz-cut.jpg"]
    assert {r["text"] for r in rows if not r["error"]} == {"slept sleep:0.3"}


def test_a_store_that_goes_away_is_a_clear_error_and_the_job_resumes(
    store: Emulator, controllable_model: Path, photo_files: dict[str, bytes]
) -> None:
    bucket = store.new_bucket()
    many = {f"{i}-{k.replace('/', '-')}": v for i in range(3) for k, v in photo_files.items()}
    upload(store, f"{bucket}/photos", many)
    out = f"{bucket}/out.jsonl"
    argv = slow_batch(controllable_model, f"{bucket}/photos", out)
    env = {**os.environ, **store.env, "HF_HUB_OFFLINE": "1"}
    journal = f"{bucket}/.out.jsonl.journal".split("://")[1]
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    wait_for_parts(store.filesystem(), journal, 0, proc)
    store.stop()
    try:
        _, stderr = proc.communicate(timeout=240)
        assert proc.returncode == 1, stderr
        last = stderr.strip().splitlines()[-1]
        assert last.startswith("blipserve: error: cannot"), stderr[-3000:]
        assert bucket.split("://")[1] in last
        assert "Traceback" not in stderr
        assert store.secret not in stderr
    finally:
        store.start()
    if store.kind == "s3":
        return  # moto's server keeps nothing across a restart: resuming is Azurite's part
    done = cli(store, *argv)
    assert done.returncode == 0, done.stderr
    assert "skipped 0" not in done.stderr
    rows = jsonl(download(store, out))
    assert sorted(r["id"] for r in rows) == sorted(many)


def test_credentials_as_storage_options_are_never_printed(
    store: Emulator, tiny_model_dir: dict[str, Path], tmp_path: Path
) -> None:
    """--storage-option carries a secret; a job that fails (no such bucket) names the
    location, never the secret; the journal's signature holds none of it either."""
    options = [f"{k}={v}" for k, v in store.storage_options.items()]
    flags = [x for opt in options for x in ("--storage-option", opt)]
    model = tiny_model_dir["blip-caption"]
    out = tmp_path / "out.jsonl"
    argv = batch_command(model, f"{store.scheme}://no-such-bucket/x", out, *flags)
    done = subprocess.run(
        argv,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode != 0
    assert "no-such-bucket" in done.stderr
    assert store.secret not in done.stderr
    assert "Traceback" not in done.stderr
    left = [p for p in tmp_path.rglob("*") if p.is_file()]  # the journal, if it was begun
    assert all(store.secret.encode() not in p.read_bytes() for p in left)


def test_images_too_big_for_the_limit_are_row_errors(store: Emulator, engine: Engine) -> None:
    bucket = store.new_bucket()
    big = Image.effect_noise((400, 400), 60).convert("RGB")  # PNG of noise: ~480 kB
    upload(
        store, f"{bucket}/p", {"big.png": _png(big), "small.jpg": jpeg_bytes(big.resize((64, 64)))}
    )
    engine_limits = engine.limits
    try:
        engine.limits = type(engine_limits)(max_image_bytes=200_000)
        summary = run(engine, store, input=f"{bucket}/p", output=f"{bucket}/o.jsonl")
    finally:
        engine.limits = engine_limits
    assert (summary.done, summary.failed) == (1, 1)
    [bad, _] = jsonl(download(store, f"{bucket}/o.jsonl"))
    assert "more than the 200000 byte limit" in bad["error"]


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_webdataset_shards_from_the_store_into_the_store(
    store: Emulator, engine: Engine, tmp_path: Path
) -> None:
    """img2dataset shards in the store, by brace pattern; captioned shards written there,
    the same as a local run writes; a lost output shard is rewritten on resume."""
    samples = img2dataset_shards(tmp_path / "shards")
    bucket = store.new_bucket()
    store.upload(
        f"{bucket}/shards", {p.name: p.read_bytes() for p in (tmp_path / "shards").iterdir()}
    )
    run(engine, input=f"{tmp_path}/shards/{{00000..00001}}.tar", output=tmp_path / "local")
    out = f"{bucket}/captioned"
    summary = run(engine, store, input=f"{bucket}/shards/{{00000..00001}}.tar", output=out)
    assert (summary.done, summary.failed, summary.written) == (6, 1, 2)
    for name in ("00000.tar", "00001.tar"):
        assert members(store.download(f"{out}/{name}")) == members(
            (tmp_path / "local" / name).read_bytes()
        )
    store.filesystem().rm(f"{out}/00001.tar".split("://")[1])
    summary = run(engine, store, input=f"{bucket}/shards/{{00000..00001}}.tar", output=out)
    assert (summary.written, summary.skipped) == (1, 4)  # shard 0 not even read
    keys = {n.split(".")[0] for n in members(store.download(f"{out}/00001.tar"))}
    assert keys == {k for k, s in samples.items() if s["shard"] == "00001.tar"}
