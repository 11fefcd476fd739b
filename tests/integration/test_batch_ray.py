"""`blipserve batch --ray` on a real local Ray cluster: the same rows as the local job.

One cluster (2 CPUs, small object store) serves the whole module and is shut down at the
end; the tiny random BLIP models keep each run to seconds.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ray = pytest.importorskip("ray")

from blipserve.batch.ray import run_on_ray  # noqa: E402
from blipserve.batch.runner import BatchJob, BatchOptions, Summary  # noqa: E402
from blipserve.config import (  # noqa: E402
    EngineConfig,
    FetchConfig,
    ModelConfig,
    RayConfig,
    Settings,
)
from blipserve.engine import Engine  # noqa: E402
from blipserve.errors import InvalidInput, ModelLoadError  # noqa: E402
from blipserve.params import GenerationParams  # noqa: E402
from helpers import (  # noqa: E402
    img2dataset_shards,
    jpeg_bytes,
    make_image,
    members,
    photos,
)
from stores import Emulator  # noqa: E402
from testkit.env import RAY_ENV  # noqa: E402

PARAMS = GenerationParams(max_new_tokens=4)
ENGINE = EngineConfig(max_batch_size=4, decode_workers=2)


@pytest.fixture(scope="module", autouse=True)
def cluster() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        for key, value in RAY_ENV.items():
            mp.setenv(key, value)
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            object_store_memory=200 * 1024 * 1024,
            log_to_driver=False,
        )
        try:
            yield
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def caption(tiny_model_dir: dict[str, Path]) -> Path:
    return tiny_model_dir["blip-caption"]


@pytest.fixture(scope="module")
def itm(tiny_model_dir: dict[str, Path]) -> Path:
    return tiny_model_dir["blip-itm"]


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """8 images, a corrupt one, and a table with a text, a missing image and no image."""
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    for i in range(7):
        make_image(i, (40 + 4 * i, 36)).save(folder / f"img{i}.png")
    make_image(9).save(folder / "sub" / "deep.JPG")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    with (folder / "table.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "text"])
        writer.writerows([["img1.png", "a photo of blocks"], ["missing.png", ""], ["", "no image"]])
    return folder


def local(model: Path, options: BatchOptions, filter_model: Path | None = None) -> Summary:
    engines = [
        Engine.load(ModelConfig(model=str(m)), config=ENGINE) for m in (model, filter_model) if m
    ]
    try:
        return BatchJob(engines[0], options, engines[1] if filter_model else None).run()
    finally:
        for engine in engines:
            engine.close()


def on_ray(
    model: Path, options: BatchOptions, filter_model: Path | None = None, concurrency: int = 1
) -> Summary:
    if filter_model:
        options = dataclasses.replace(options, filter_model=str(filter_model))
    settings = Settings(
        model=ModelConfig(model=str(model)),
        engine=ENGINE,
        fetch=FetchConfig(allow_urls=False),
        ray=RayConfig(concurrency=concurrency),
    )
    return run_on_ray(options, settings)


def options(images: str | Path, output: str | Path, **kwargs: Any) -> BatchOptions:
    return BatchOptions(
        input=images, output=output, params=PARAMS, progress=False, chunk_rows=2, **kwargs
    )


def by_id(row: dict[str, Any]) -> str:
    return str(row["id"])


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def same_rows(rows: list[dict[str, Any]], expected: list[dict[str, Any]]) -> None:
    """Equal rows: ids, order, texts, errors and flags exactly; scores to float rounding
    (the actors' torch may use another thread count than this process)."""
    assert [r.keys() for r in rows] == [r.keys() for r in expected]
    for row, want in zip(rows, expected, strict=True):
        for key, value in want.items():
            if isinstance(value, float):
                assert row[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (row["id"], key)
            else:
                assert row[key] == value, (row["id"], key)


def counts(summary: Summary) -> tuple[int, int, int]:
    return summary.done, summary.failed, summary.skipped


def test_same_rows_as_the_local_job(caption: Path, images: Path, tmp_path: Path) -> None:
    local_summary = local(caption, options(images, tmp_path / "local.jsonl"))
    ray_summary = on_ray(
        caption, options(images, tmp_path / "ray.jsonl", sidecar=".txt"), concurrency=2
    )
    expected = read_jsonl(tmp_path / "local.jsonl")
    rows = read_jsonl(tmp_path / "ray.jsonl")
    same_rows(rows, expected)
    by_id = {r["id"]: r for r in rows}
    assert len(rows) == 12
    assert "truncated or corrupt" in by_id["broken.png"]["error"]
    assert by_id["table.csv:1"]["error"]  # missing.png
    assert by_id["table.csv:2"]["error"] == "'image' is missing"
    assert by_id["table.csv:0"]["text"]
    assert not by_id["table.csv:0"]["error"]
    assert counts(ray_summary) == counts(local_summary) == (9, 3, 0)
    assert ray_summary.written == 12
    assert ray.is_initialized()  # the module's cluster: run_on_ray leaves it running
    # sidecars next to the images, like the local job's
    assert (images / "img0.txt").read_text() == by_id["img0.png"]["text"] + "\n"
    assert (images / "sub" / "deep.txt").read_text() == by_id["sub/deep.JPG"]["text"] + "\n"
    assert not (images / "broken.txt").exists()


def test_resume_each_other(caption: Path, images: Path, tmp_path: Path) -> None:
    """A local run cut short is finished on Ray, and the other way round."""
    out = tmp_path / "out.jsonl"
    journal = tmp_path / ".out.jsonl.journal.jsonl"
    local(caption, options(images, out))
    expected = read_jsonl(out)
    lines = journal.read_bytes().splitlines(keepends=True)
    journal.write_bytes(b"".join(lines[:5]) + lines[5][:17])  # 4 rows, then a torn line
    summary = on_ray(caption, options(images, out))
    assert counts(summary) == (6, 2, 4)
    same_rows(read_jsonl(out), expected)
    assert [json.loads(line)["id"] for line in journal.read_bytes().splitlines()[1:]] == [
        r["id"] for r in expected
    ]  # each row journaled once

    journal.write_bytes(b"".join(journal.read_bytes().splitlines(keepends=True)[:8]))
    summary = local(caption, options(images, out))  # and a Ray journal finished locally
    assert counts(summary) == (3, 2, 7)
    same_rows(read_jsonl(out), expected)

    summary = on_ray(caption, options(images, out, retry_errors=True))
    assert counts(summary) == (0, 3, 9)  # only the failed rows again, still failing
    # (a retried row's record is its latest, so it moves to the end, as locally)
    same_rows(sorted(read_jsonl(out), key=by_id), sorted(expected, key=by_id))


def test_capfilt_same_as_local(caption: Path, itm: Path, images: Path, tmp_path: Path) -> None:
    local(caption, options(images, tmp_path / "local.jsonl", min_match=0.3), itm)
    on_ray(caption, options(images, tmp_path / "ray.jsonl", min_match=0.3), itm)
    rows = read_jsonl(tmp_path / "ray.jsonl")
    same_rows(rows, read_jsonl(tmp_path / "local.jsonl"))
    by_id = {r["id"]: r for r in rows}
    assert isinstance(by_id["img0.png"]["keep"], bool)
    assert by_id["table.csv:0"]["text_in"] == "a photo of blocks"
    assert isinstance(by_id["table.csv:0"]["text_in_score"], float)


def test_a_model_that_cannot_load_is_a_clear_error(images: Path, tmp_path: Path) -> None:
    model = tmp_path / "not-blip"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "bert", "architectures": ["BertModel"]}')
    with pytest.raises(ModelLoadError, match="does not serve"):
        on_ray(model, options(images, tmp_path / "out.jsonl"))


def test_without_ray(caption: Path, images: Path, tmp_path: Path) -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "ray", None)  # `import ray` fails
        with pytest.raises(InvalidInput, match=r"pip install 'blipserve\[ray\]'"):
            on_ray(caption, options(images, tmp_path / "out.jsonl"))


def test_cli_starts_and_stops_its_own_cluster(caption: Path, images: Path, tmp_path: Path) -> None:
    """`blipserve batch --ray` without --ray-address: a local cluster of its own, gone after."""
    env = {**os.environ, **RAY_ENV}
    env.pop("RAY_ADDRESS", None)
    out = tmp_path / "predictions.csv"
    cmd = [sys.executable, "-m", "blipserve.cli", "batch", str(images), "--output", str(out)]
    cmd += ["--model", str(caption), "--max-new-tokens", "4", "--ray", "--no-progress"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "blipserve batch: done 9, failed 3, skipped 0" in done.stderr
    rows = list(csv.reader(out.read_text().splitlines()))
    assert len(rows) == 12
    assert rows[0] == ["", "", "broken.png"]  # the catalog's row, prediction, file


def test_actors_read_an_object_store_themselves(
    store: Emulator, caption: Path, tmp_path: Path
) -> None:
    """Input and output in the store (Azurite, moto's S3): no shared filesystem; the actors
    read the images with the job's storage options, and the rows are the local job's."""
    files = {f"{name}.jpg": jpeg_bytes(img) for name, img in photos().items()}
    files["sub/cut.jpg"] = files["coffee.jpg"][:3000]
    bucket = store.new_bucket()
    store.upload(f"{bucket}/photos", files)
    kwargs = {"storage_options": store.storage_options}
    reference = f"{bucket}/local.jsonl"
    local(caption, options(f"{bucket}/photos", reference, **kwargs))
    out = f"{bucket}/ray.jsonl"
    summary = on_ray(caption, options(f"{bucket}/photos", out, **kwargs))
    assert counts(summary) == (6, 1, 0)
    rows = [json.loads(x) for x in store.download(out).decode().splitlines()]
    want = [json.loads(x) for x in store.download(reference).decode().splitlines()]
    same_rows(rows, want)
    assert "truncated" in rows[-1]["error"]


def forbid_reading_shards_here(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process (the driver) cannot read a shard's samples; the actors still can."""

    def refuse(*_: object) -> None:
        raise AssertionError("the driver read a shard")

    monkeypatch.setattr("blipserve.batch.sources.samples", refuse)
    monkeypatch.setattr("blipserve.batch.shards.samples", refuse)


def test_actors_read_and_write_shards_themselves(caption: Path, tmp_path: Path) -> None:
    """WebDataset shards split across two actors, shard by shard: each actor reads its
    shard and writes its captioned shard; the driver never reads a sample.  Output shards
    and table rows are the local job's."""
    img2dataset_shards(tmp_path / "shards", per_shard=4)
    local(caption, options(tmp_path / "shards", tmp_path / "local", text_from="txt"))
    local(caption, options(tmp_path / "shards", tmp_path / "local.jsonl", text_from="txt"))
    with pytest.MonkeyPatch.context() as mp:
        forbid_reading_shards_here(mp)
        summary = on_ray(
            caption, options(tmp_path / "shards", tmp_path / "ray", text_from="txt"), concurrency=2
        )
        assert (summary.done, summary.failed, summary.skipped, summary.written) == (8, 1, 0, 2)
        on_ray(caption, options(tmp_path / "shards", tmp_path / "ray.jsonl", text_from="txt"))
    for name in ("00000.tar", "00001.tar"):
        got = members((tmp_path / "ray" / name).read_bytes())
        assert got == members((tmp_path / "local" / name).read_bytes())
        assert any(n.endswith(".caption.txt") for n in got)
    same_rows(read_jsonl(tmp_path / "ray.jsonl"), read_jsonl(tmp_path / "local.jsonl"))
    assert not list((tmp_path / "ray").glob(".*.tar*"))  # no temporary shard left behind


def test_shards_resume_local_and_ray(caption: Path, tmp_path: Path) -> None:
    """A local run of shards cut short (a torn journal, the second output shard lost) is
    finished by Ray: the written shard is not read again, the recorded rows are not
    captioned again, and the output is a whole run's."""
    img2dataset_shards(tmp_path / "shards", per_shard=4)
    out = tmp_path / "captioned"
    local(caption, options(tmp_path / "shards", out))
    whole = {p.name: members(p.read_bytes()) for p in sorted(out.glob("*.tar"))}
    journal = tmp_path / ".captioned.journal.jsonl"
    lines = journal.read_bytes().splitlines(keepends=True)
    journal.write_bytes(b"".join(lines[:7]) + lines[7][:9])  # shard 0 and 2 rows of shard 1
    (out / "00001.tar").unlink()
    summary = on_ray(caption, options(tmp_path / "shards", out))
    assert (summary.done, summary.failed, summary.skipped, summary.written) == (2, 1, 2, 1)
    assert {p.name: members(p.read_bytes()) for p in sorted(out.glob("*.tar"))} == whole
    ids = [json.loads(line)["id"] for line in journal.read_bytes().splitlines()[1:]]
    assert len(ids) == len(set(ids)) == 9  # each row journaled once


def test_actors_read_shards_from_an_object_store(
    store: Emulator, caption: Path, tmp_path: Path
) -> None:
    """Shards in the store by brace pattern, captioned shards into the store, by the
    actors with the job's storage options; the same shards as a local run writes."""
    img2dataset_shards(tmp_path / "shards")
    local(caption, options(tmp_path / "shards", tmp_path / "local"))
    bucket = store.new_bucket()
    store.upload(
        f"{bucket}/shards", {p.name: p.read_bytes() for p in (tmp_path / "shards").iterdir()}
    )
    kwargs = {"storage_options": store.storage_options}
    out = f"{bucket}/captioned"
    pattern = f"{bucket}/shards/{{00000..00001}}.tar"
    summary = on_ray(caption, options(pattern, out, **kwargs), concurrency=2)
    assert (summary.done, summary.failed, summary.written) == (6, 1, 2)
    for name in ("00000.tar", "00001.tar"):
        got = members(store.download(f"{out}/{name}"))
        assert got == members((tmp_path / "local" / name).read_bytes())
