"""Batch jobs tried as a new user would: the catalog's CSV layout with ordinary photographs
(base64 with line breaks), outputs in the input folder, resuming from another directory,
huge cells in messages, and --max-failures."""

from __future__ import annotations

import base64
import csv
import io
import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from PIL import Image

from blipserve.batch.runner import BatchJob, BatchOptions, Summary, TooManyFailures
from blipserve.batch.sources import iter_rows
from blipserve.batch.storage import locate
from blipserve.batch.tables import image_file
from blipserve.config import FailureLimit
from blipserve.engine import Engine
from blipserve.errors import InvalidInput
from blipserve.params import GenerationParams
from blipserve.types import RowInput
from helpers import client_base64, jpeg_bytes, photos

PARAMS = GenerationParams(max_new_tokens=4)


@pytest.fixture(scope="module")
def photo_jpegs() -> dict[str, bytes]:
    return {name: jpeg_bytes(img) for name, img in photos().items()}


def short_base64_with_slashes() -> str:
    """Base64 (one line, as ``b64encode`` writes it) of a real but small PNG, short enough
    to pass for a path, with a '/'-separated part longer than any file name may be."""
    for seed in range(500):
        img = Image.effect_noise((24, 24), 40 + seed).convert("RGB")
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        text = base64.b64encode(buf.getvalue()).decode()
        if len(text) < 4096 and "/" in text and max(map(len, text.split("/"))) > 255:
            return text
    raise AssertionError("no such image")


def photo_folder(folder: Path, jpegs: dict[str, bytes]) -> Path:
    """``folder`` holding each photo as ``NAME.jpg``."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in jpegs.items():
        (folder / f"{name}.jpg").write_bytes(data)
    return folder


def run(engine: Engine, **kwargs: Any) -> tuple[BatchJob, Summary]:
    options = BatchOptions(params=PARAMS, progress=False, chunk_rows=3, **kwargs)
    job = BatchJob(engine, options)
    return job, job.run()


def caption_of(engine: Engine, image: str | bytes) -> str:
    [pred] = engine.predict([RowInput(0, image)], PARAMS)
    return getattr(pred, "text", f"failed: {pred}")


def test_catalog_folder_of_csvs_with_photos(
    engine: Engine, photo_jpegs: dict[str, bytes], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The catalog's batch samples: pandas to_csv (with its index) of base64 written with
    encodebytes: every row is captioned, none is taken for a file path."""
    cells = [client_base64(data) for data in photo_jpegs.values()]
    assert all("\n" in c and len(c) > 40_000 for c in cells)
    folder = tmp_path / "inputs"
    folder.mkdir()
    pd.DataFrame({"image": cells[:3]}).to_csv(folder / "part-0.csv")
    short = short_base64_with_slashes()
    pd.DataFrame({"image": [*cells[3:], short]}, index=[10, 11, 12, 13]).to_csv(
        folder / "part-1.csv"
    )
    out = tmp_path / "out" / "predictions.csv"
    with caplog.at_level(logging.WARNING):
        _, summary = run(engine, input=folder, output=out)
    assert (summary.done, summary.failed) == (len(cells) + 1, 0), caplog.text
    rows = list(csv.reader(io.StringIO(out.read_text())))
    assert [r[0] for r in rows] == ["0", "1", "2", "10", "11", "12", "13"]
    assert [r[2] for r in rows] == ["part-0.csv"] * 3 + ["part-1.csv"] * 4
    expected = [caption_of(engine, c) for c in [*cells, short]]
    assert [r[1] for r in rows] == expected
    assert all(expected)


def test_a_check_on_a_cell_never_escapes_its_row(engine: Engine, tmp_path: Path) -> None:
    cells = [
        short_base64_with_slashes(),
        "a\x00b.png",
        "x" * 5000,
        "../" * 40 + "etc/passwd",
        "~/surely-not-here.jpg",
        "nested/" + "n" * 300 + ".png",
    ]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"image": c}) + "\n" for c in cells))
    out = tmp_path / "out.jsonl"
    _, summary = run(engine, input=tmp_path / "t.jsonl", output=out)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == len(cells)
    assert records[0]["error"] == ""  # the short base64 image is an image
    assert summary.failed == len(cells) - 1
    assert "not found" in records[4]["error"]
    assert "surely-not-here.jpg" in records[4]["error"]


def test_what_a_cell_is_is_decided_from_its_text(tmp_path: Path) -> None:
    base = locate(tmp_path)
    (tmp_path / "AbC").write_bytes(b"x")
    photo = client_base64(jpeg_bytes(photos()["coffee"]))
    assert image_file(base, photo) is None
    assert image_file(base, photo.replace("\n", "")) is None
    assert image_file(base, "https://example.com/a.jpg") is None
    assert image_file(base, "data:image/png;base64,AAAA") is None
    assert image_file(base, "s3://bucket/k.jpg") == "s3://bucket/k.jpg"
    assert image_file(base, "sub/a.jpg") == str(tmp_path / "sub" / "a.jpg")
    assert image_file(base, "AbC") == str(tmp_path / "AbC")  # base64's letters, but a file
    assert image_file(base, "AbCd") is None  # no such file: base64
    remote = locate(tmp_path).__class__(base.fs, "bucket/dir", "s3")
    assert image_file(remote, "sub/a.jpg") == "s3://bucket/dir/sub/a.jpg"
    assert image_file(remote, "AbC") is None


def test_outputs_in_the_input_folder_are_never_inputs(
    engine: Engine, photo_jpegs: dict[str, bytes], tmp_path: Path
) -> None:
    images = photo_folder(tmp_path / "images", photo_jpegs)
    out = images / "metadata.jsonl"
    for attempt in range(2):
        _, summary = run(engine, input=images, output=out, sidecar=".txt")
        assert summary.failed == 0
        assert (summary.done, summary.skipped) == ((6, 0) if attempt == 0 else (0, 6))
        assert len(out.read_text().splitlines()) == 6
    # another job over the same folder: metadata.jsonl (no 'image' column) and the
    # caption files are not inputs either
    _, summary = run(engine, input=images, output=tmp_path / "other.jsonl")
    assert (summary.done, summary.failed) == (6, 0)
    ids = [json.loads(line)["id"] for line in (tmp_path / "other.jsonl").read_text().splitlines()]
    assert ids == sorted(f"{name}.jpg" for name in photo_jpegs)


def test_resume_from_another_working_directory(
    engine: Engine, photo_jpegs: dict[str, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    photo_folder(tmp_path / "a" / "images", photo_jpegs)
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    run(engine, input="images", output="images/metadata.jsonl")
    journal = tmp_path / "a" / "images" / ".metadata.jsonl.journal.jsonl"
    lines = journal.read_bytes().splitlines(keepends=True)
    journal.write_bytes(b"".join(lines[:3]))  # as if killed after two rows
    (tmp_path / "a" / "images" / "metadata.jsonl").unlink()

    monkeypatch.chdir(tmp_path / "b")
    _, summary = run(engine, input="../a/images", output="../a/images/metadata.jsonl")
    assert (summary.done, summary.skipped, summary.failed) == (4, 2, 0)
    rows = [json.loads(x) for x in (tmp_path / "a/images/metadata.jsonl").read_text().splitlines()]
    assert sorted(r["file_name"] for r in rows) == sorted(f"{n}.jpg" for n in photo_jpegs)


def test_messages_quote_a_prefix_of_huge_cells(
    engine: Engine, photo_jpegs: dict[str, bytes], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = client_base64(photo_jpegs["rocket"])
    broken = good[:30_000] + "!" + good[30_000:]  # not base64
    not_an_image = client_base64(bytes(range(256)) * 400)
    huge_path_like = "folder/" + "y" * 100_000
    pd.DataFrame({"image": [broken, not_an_image, huge_path_like, good]}).to_csv(tmp_path / "t.csv")
    out = tmp_path / "out.jsonl"
    with caplog.at_level(logging.INFO):
        run(engine, input=tmp_path / "t.csv", output=out)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [bool(r["error"]) for r in records] == [True, True, True, False]
    for record in records:
        assert len(record["error"]) < 400, record["error"]
    for cell in (broken, not_an_image, huge_path_like):
        assert cell[1000:1200] not in caplog.text
    assert len(caplog.text) < 10_000


def test_failure_limit_parsing() -> None:
    assert FailureLimit.parse(None) is None
    assert FailureLimit.parse("3") == FailureLimit(count=3)
    assert FailureLimit.parse("2.5%") == FailureLimit(percent=2.5)
    for bad in ("-1", "x", "101%", "1.5"):
        with pytest.raises(InvalidInput, match="--max-failures"):
            FailureLimit.parse(bad)
    limit = FailureLimit(percent=10)
    assert not limit.exceeded(1, 10)
    assert limit.exceeded(2, 10)
    assert not limit.exceeded(2, 3, bound=30)  # early: against the most rows there can be
    assert limit.exceeded(4, 5, bound=30)


def test_max_failures_stops_the_job_and_keeps_what_is_done(
    engine: Engine, photo_jpegs: dict[str, bytes], tmp_path: Path
) -> None:
    images = photo_folder(tmp_path / "images", photo_jpegs)
    for name, data in photo_jpegs.items():
        (images / f"{name}-cut.jpg").write_bytes(data[: len(data) // 3])
    out = tmp_path / "out.jsonl"
    with pytest.raises(TooManyFailures, match="more than --max-failures 2"):
        run(engine, input=images, output=out, max_failures=FailureLimit(count=2))
    assert not out.exists()
    journal_text = (tmp_path / ".out.jsonl.journal.jsonl").read_text()
    journal = [json.loads(x) for x in journal_text.splitlines()][1:]
    assert 3 <= len(journal) < 12
    # half the rows fail: 50% is within the limit, and the rerun resumes
    _, summary = run(engine, input=images, output=out, max_failures=FailureLimit(percent=50))
    assert summary.skipped == len(journal)
    assert summary.done + summary.failed + summary.skipped == 12
    # 40%: stopped as soon as more than 40% of the 12 input rows have failed
    with pytest.raises(TooManyFailures, match=r"[5-6] of \d+ rows failed, more than .* 40%"):
        run(
            engine,
            input=images,
            output=tmp_path / "o2.jsonl",
            max_failures=FailureLimit(percent=40),
        )
    assert list(iter_rows(images))  # the inputs are untouched
