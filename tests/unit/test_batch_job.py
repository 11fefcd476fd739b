"""The local batch job on tiny models: formats, sidecars, bad rows, resume, CapFilt."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, cast

import pandas as pd
import pytest

from blipserve.batch.journal import OutputError
from blipserve.batch.runner import BatchJob, BatchOptions, Summary
from blipserve.config import ModelConfig
from blipserve.engine import Engine
from blipserve.params import GenerationParams
from blipserve.types import Prediction
from helpers import make_image

PARAMS = GenerationParams(max_new_tokens=4)


@pytest.fixture(scope="module")
def itm(tiny_model_dir: dict[str, Path]) -> Engine:
    return Engine.load(ModelConfig(model=str(tiny_model_dir["blip-itm"])))


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    for i in range(6):
        make_image(i, (40 + 4 * i, 36)).save(folder / f"img{i}.png")
    make_image(9).save(folder / "sub" / "deep.JPG")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    return folder


def run(engine: Engine, **kwargs: Any) -> tuple[BatchJob, Summary]:
    options = BatchOptions(params=PARAMS, progress=False, chunk_rows=3, **kwargs)
    job = BatchJob(engine, options)
    return job, job.run()


def read_jsonl(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_output_and_bad_rows(engine: Engine, images: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    _, summary = run(engine, input=images, output=out)
    rows = read_jsonl(out)
    assert [r["id"] for r in rows] == [
        "broken.png",
        *[f"img{i}.png" for i in range(6)],
        "sub/deep.JPG",
    ]
    assert set(rows[0]) == {"id", "text", "score", "error"}
    assert "truncated or corrupt" in str(rows[0]["error"])
    assert all(r["text"] and r["error"] == "" for r in rows[1:])
    assert (summary.done, summary.failed, summary.skipped) == (7, 1, 0)
    # same answers as the engine gives row by row
    from blipserve.types import RowInput

    [direct] = engine.predict([RowInput(0, str(images / "img3.png"))], PARAMS, allow_paths=True)
    assert isinstance(direct, Prediction)
    assert rows[4]["text"] == direct.text


@pytest.mark.parametrize("name", ["out.csv", "out.parquet"])
def test_table_formats(engine: Engine, images: Path, tmp_path: Path, name: str) -> None:
    out = tmp_path / name
    run(engine, input=images, output=out)
    frame = (
        pd.read_csv(out, keep_default_na=False) if name.endswith(".csv") else pd.read_parquet(out)
    )
    assert list(frame.columns) == ["id", "text", "score", "error"]
    assert len(frame) == 8
    assert (frame["error"] != "").sum() == 1


def test_catalog_predictions_csv(engine: Engine, tmp_path: Path) -> None:
    import base64

    from helpers import png_bytes

    folder = tmp_path / "catalog"
    folder.mkdir()
    images = [base64.encodebytes(png_bytes(make_image(i))).decode() for i in range(3)]
    pd.DataFrame({"image": [*images, "!!notbase64"]}, index=[10, 11, 12, 13]).to_csv(
        folder / "input.csv"
    )
    out = tmp_path / "out" / "predictions.csv"
    run(engine, input=folder, output=out)
    with out.open() as f:
        lines = list(csv.reader(f))
    assert [line[0] for line in lines] == ["10", "11", "12", "13"]
    assert all(line[2] == "input.csv" for line in lines)
    assert all(line[1] for line in lines[:3])
    assert lines[3][1] == ""  # the bad row has no prediction


def test_imagefolder_metadata_loads_with_datasets(engine: Engine, images: Path) -> None:
    datasets = pytest.importorskip("datasets")
    (images / "broken.png").unlink()  # datasets itself cannot open it
    run(engine, input=images, output=images / "metadata.jsonl")
    meta = read_jsonl(images / "metadata.jsonl")
    assert {m["file_name"] for m in meta} == {f"img{i}.png" for i in range(6)} | {"sub/deep.JPG"}
    loaded = datasets.load_dataset("imagefolder", data_dir=str(images), split="train")
    assert len(loaded) == 7
    assert set(loaded["text"]) == {m["text"] for m in meta}


def test_sidecars_left_alone_unless_overwrite(engine: Engine, images: Path) -> None:
    (images / "img0.txt").write_text("my own caption\n")
    _, summary = run(engine, input=images, sidecar=".txt")
    assert (images / "img0.txt").read_text() == "my own caption\n"
    assert summary.skipped == 1
    assert (images / "img1.txt").read_text().strip()
    assert (images / "sub" / "deep.txt").exists()
    assert not (images / "broken.txt").exists()
    # a rerun does nothing new: the sidecars are the record
    _, again = run(engine, input=images, sidecar=".txt")
    assert (again.done, again.skipped) == (0, 7)
    run(engine, input=images, sidecar=".txt", overwrite=True)
    assert (images / "img0.txt").read_text() != "my own caption\n"


def test_resume_after_a_cut_journal(engine: Engine, images: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    run(engine, input=images, output=out)
    complete = read_jsonl(out)
    journal = tmp_path / ".out.jsonl.journal.jsonl"
    lines = journal.read_bytes().splitlines(keepends=True)
    # keep the header and 3 rows, then half a row, as a SIGKILL mid-write would leave it
    journal.write_bytes(b"".join(lines[:4]) + lines[4][:17])
    out.unlink()
    _, summary = run(engine, input=images, output=out)
    assert summary.skipped == 3
    assert summary.done + summary.failed == 5
    assert sorted(read_jsonl(out), key=lambda r: str(r["id"])) == sorted(
        complete, key=lambda r: str(r["id"])
    )


def test_a_stopped_job_ends_at_its_next_commit(
    engine: Engine, images: Path, tmp_path: Path
) -> None:
    import threading

    from blipserve.errors import JobStopped

    stop = threading.Event()
    stop.set()  # (a hosted job canceled before its first chunk was done)
    out = tmp_path / "out.jsonl"
    options = BatchOptions(input=images, output=out, params=PARAMS, progress=False, chunk_rows=3)
    with pytest.raises(JobStopped):
        BatchJob(engine, options, stop=stop).run()
    assert not out.exists()
    journal = tmp_path / ".out.jsonl.journal.jsonl"
    assert journal.read_bytes().count(b"\n") == 1 + 3  # the signature, the first chunk
    _, summary = run(engine, input=images, output=out)
    assert (summary.skipped, summary.done + summary.failed) == (3, 5)


def test_retry_errors_and_other_jobs_refused(engine: Engine, images: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    run(engine, input=images, output=out)
    make_image(5).save(images / "broken.png")  # fixed since
    _, summary = run(engine, input=images, output=out)
    assert summary.skipped == 8
    _, summary = run(engine, input=images, output=out, retry_errors=True)
    assert (summary.done, summary.skipped) == (1, 7)
    rows = read_jsonl(out)
    assert len(rows) == 8
    assert all(r["error"] == "" for r in rows)
    with pytest.raises(OutputError, match="belongs to a different job"):
        BatchJob(
            engine, BatchOptions(input=images, output=out, prompt="other", progress=False)
        ).run()


def test_unwritable_output_is_a_clear_error(engine: Engine, images: Path, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="cannot write"):
        run(engine, input=images, output=tmp_path / "file" / "out.jsonl")


def test_capfilt(engine: Engine, itm: Engine, tmp_path: Path) -> None:
    folder = tmp_path / "web"
    folder.mkdir()
    for i in range(3):
        make_image(i).save(folder / f"{i}.png")
    pd.DataFrame(
        {"image": [f"{i}.png" for i in range(3)], "text": ["a dog", None, "a cat"]}
    ).to_csv(folder / "web.csv", index=False)
    results = {}
    for threshold in (0.0, 1.0):
        out = tmp_path / f"out{threshold}.jsonl"
        job = BatchJob(
            engine,
            BatchOptions(
                input=folder / "web.csv",
                output=out,
                params=PARAMS,
                min_match=threshold,
                progress=False,
            ),
            itm,
        )
        job.run()
        results[threshold] = read_jsonl(out)
    keep_all, keep_none = results[0.0], results[1.0]
    for row in keep_all:
        assert 0.0 <= float(cast(float, row["score"])) <= 1.0
        assert row["keep"] is True
    assert keep_all[0]["text_in"] == "a dog"
    assert keep_all[0]["text_in_keep"] is True
    assert "text_in" not in keep_all[1]
    assert all(row["keep"] is False for row in keep_none)
    assert [r["score"] for r in keep_none] == [r["score"] for r in keep_all]


def _commit_chunks(commit: Any, chunks: range, *, then_fail: bool = False) -> None:
    """Chunks ``{"n": i}`` through :class:`CommitBehind`, as ``BatchJob.run`` sends them;
    ``then_fail``: the job then fails (a store going away)."""
    from blipserve.batch.runner import CommitBehind

    with CommitBehind(commit) as committer:
        for n in chunks:
            committer.submit([{"n": n}])
        if then_fail:
            raise RuntimeError("the store went away")


def test_chunks_are_committed_in_order_behind_the_model() -> None:
    import threading
    import time

    committed: list[tuple[str, int]] = []

    def commit(records: list[Any]) -> None:
        time.sleep(0.01)  # (a slow fsync: the job's thread goes on meanwhile)
        committed.append((threading.current_thread().name, records[0]["n"]))

    _commit_chunks(commit, range(5))
    assert [n for _, n in committed] == list(range(5))  # all of them, in order, by exit
    assert all(name.startswith("blipserve-commit") for name, _ in committed)


def test_a_failed_commit_stops_the_job_at_the_next_chunk() -> None:
    committed: list[int] = []

    def commit(records: list[Any]) -> None:
        if records[0]["n"] == 1:
            raise OutputError("disk full")
        committed.append(records[0]["n"])

    with pytest.raises(OutputError, match="disk full"):
        _commit_chunks(commit, range(5))
    assert committed == [0]  # nothing after chunk 1 was committed: the job stopped at 2

    # The job failing elsewhere: the chunk being committed is kept, the job's error raised.
    committed.clear()
    with pytest.raises(RuntimeError, match="the store"):
        _commit_chunks(commit, range(7, 8), then_fail=True)
    assert committed == [7]
