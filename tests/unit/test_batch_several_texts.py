"""Batch jobs with several captions per image: the ``texts`` column of each table format,
sidecars with the best caption or all of them, and resuming a job that recorded them."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from blipserve.batch.runner import BatchJob, BatchOptions, Summary
from blipserve.engine import Engine
from blipserve.params import GenerationParams
from helpers import make_image

SEVERAL = GenerationParams(max_new_tokens=4, num_beams=3, num_return_sequences=3)
IMAGES = [f"img{i}.png" for i in range(4)]


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for i, name in enumerate(IMAGES):
        make_image(i).save(folder / name)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)  # fails first
    return folder


def run(engine: Engine, params: GenerationParams = SEVERAL, **kwargs: Any) -> Summary:
    options = BatchOptions(params=params, progress=False, chunk_rows=2, **kwargs)
    return BatchJob(engine, options).run()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_texts(rows: list[dict[str, Any]]) -> None:
    """The failed row first (no texts), then each image with three, the best first."""
    assert [r["id"] for r in rows] == ["broken.png", *IMAGES]
    assert rows[0]["error"]
    assert not rows[0].get("texts")
    for row in rows[1:]:
        assert len(row["texts"]) == 3
        assert row["texts"][0] == row["text"]


def test_texts_column_in_jsonl_csv_and_parquet(
    engine: Engine, images: Path, tmp_path: Path
) -> None:
    run(engine, input=images, output=tmp_path / "out.jsonl")
    jsonl = read_jsonl(tmp_path / "out.jsonl")
    check_texts(jsonl)
    assert "texts" not in jsonl[0]  # a failed row has none

    run(engine, input=images, output=tmp_path / "out.csv")
    with (tmp_path / "out.csv").open(newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["id", "text", "score", "error", "texts"]
    assert table[0]["texts"] == ""
    check_texts([{**r, "texts": json.loads(r["texts"] or "null")} for r in table])
    assert [json.loads(r["texts"]) for r in table[1:]] == [r["texts"] for r in jsonl[1:]]

    run(engine, input=images, output=tmp_path / "out.parquet")
    check_texts(pq.read_table(tmp_path / "out.parquet").to_pylist())


def test_one_caption_asked_for_writes_no_texts_column(
    engine: Engine, images: Path, tmp_path: Path
) -> None:
    run(engine, GenerationParams(max_new_tokens=4), input=images, output=tmp_path / "out.csv")
    with (tmp_path / "out.csv").open(newline="") as f:
        assert next(csv.reader(f)) == ["id", "text", "score", "error"]


@pytest.mark.parametrize("captions", ["best", "all"])
def test_sidecars_hold_the_best_caption_or_all(
    engine: Engine, images: Path, tmp_path: Path, captions: str
) -> None:
    out = tmp_path / "out.jsonl"
    run(engine, input=images, output=out, sidecar=".txt", sidecar_captions=captions)
    by_id = {r["id"]: r for r in read_jsonl(out)}
    for name in IMAGES:
        lines = (images / name).with_suffix(".txt").read_text().splitlines()
        texts = by_id[name]["texts"]
        assert lines == (texts if captions == "all" else texts[:1])
    assert not (images / "broken.txt").exists()


def test_resumed_job_writes_the_texts_it_recorded(
    engine: Engine, images: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out.jsonl"
    run(engine, input=images, output=out)
    first = read_jsonl(out)
    journal = tmp_path / ".out.jsonl.journal.jsonl"
    lines = journal.read_bytes().splitlines(keepends=True)
    journal.write_bytes(b"".join(lines[:3]) + lines[3][:10])  # killed mid-row
    summary = run(engine, input=images, output=out)
    assert summary.skipped == 2  # recorded before the kill, with their texts
    assert summary.done == 3
    assert read_jsonl(out) == first
