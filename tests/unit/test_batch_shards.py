"""WebDataset shards in img2dataset's layout: read by pattern, captioned into new shards
(read back with the webdataset library), resumed shard by shard."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Any

import pytest

from blipserve.batch.book import JobBook
from blipserve.batch.runner import BatchJob, BatchOptions, Summary
from blipserve.batch.sources import ReadOptions, iter_rows
from blipserve.batch.storage import OutputError, locate
from blipserve.engine import Engine
from blipserve.errors import InvalidInput
from blipserve.params import GenerationParams
from blipserve.types import RowInput
from helpers import img2dataset_shards

PARAMS = GenerationParams(max_new_tokens=4)


def run(engine: Engine, **kwargs: Any) -> Summary:
    options = BatchOptions(params=PARAMS, progress=False, chunk_rows=2, **kwargs)
    return BatchJob(engine, options).run()


def caption_of(engine: Engine, data: bytes, text: str | None = None) -> str:
    [pred] = engine.predict([RowInput(0, data, text)], PARAMS)
    return getattr(pred, "text", "")


def test_rows_of_a_pattern_of_shards(tmp_path: Path) -> None:
    samples = img2dataset_shards(tmp_path / "shards")
    rows = list(iter_rows(f"{tmp_path}/shards/{{00000..00001}}.tar"))
    assert [r.id for r in rows] == list(samples)
    assert [r.source for r in rows] == [s["shard"] for s in samples.values()]
    assert rows[0].data == samples["000000000"]["image"]
    assert rows[0].text is None
    assert "sample has no image" in (rows[-1].error or "")

    rows = list(iter_rows(tmp_path / "shards", ReadOptions(text_from="txt")))  # a folder
    assert rows[1].text == f"a photo of {samples['000000001']['name']}"
    rows = list(iter_rows(tmp_path / "shards" / "00000.tar", ReadOptions(text_from="json:caption")))
    assert [r.text for r in rows] == [f"alt {s['name']}" for s in list(samples.values())[:3]]


def test_bad_shards_and_patterns_are_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "bad.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(InvalidInput, match="not a readable tar file"):
        list(iter_rows(tmp_path / "bad.tar"))
    with pytest.raises(InvalidInput, match=r"not a \.tar"):
        list(iter_rows(f"{tmp_path}/{{0..2}}.zip"))
    options = BatchOptions(input=tmp_path / "bad.tar", output=tmp_path / "o", text_from="yaml")
    with pytest.raises(InvalidInput, match="--text-from wants txt or json:FIELD"):
        JobBook(options, "model")
    options = BatchOptions(input=tmp_path / "bad.tar", sidecar=".txt")
    with pytest.raises(InvalidInput, match="shards have none"):
        JobBook(options, "model")


def test_shards_to_a_table_keyed_by_sample(engine: Engine, tmp_path: Path) -> None:
    samples = img2dataset_shards(tmp_path / "shards")
    out = tmp_path / "captions.jsonl"
    summary = run(
        engine, input=f"{tmp_path}/shards/{{00000..00001}}.tar", output=out, text_from="txt"
    )
    assert (summary.done, summary.failed) == (6, 1)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == list(samples)
    first = samples["000000000"]
    assert rows[0]["text"] == caption_of(engine, first["image"], f"a photo of {first['name']}")


# webdataset (1.0) leaves each shard's file for the garbage collector to close
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_captioned_shards_shard_for_shard(engine: Engine, tmp_path: Path) -> None:
    wds = pytest.importorskip("webdataset")
    samples = img2dataset_shards(tmp_path / "shards")
    out = tmp_path / "captioned"
    summary = run(engine, input=tmp_path / "shards", output=out)
    assert summary.written == 2
    assert sorted(p.name for p in out.iterdir()) == ["00000.tar", "00001.tar"]
    got = {}
    for sample in wds.WebDataset(str(out / "{00000..00001}.tar"), shardshuffle=False):
        got[sample["__key__"]] = sample
    assert list(got) == list(samples)
    for key, want in samples.items():
        sample = got[key]
        if want["image"] is None:  # copied as it was
            assert set(sample) >= {"json"}
            assert "caption.txt" not in sample
            continue
        assert sample["jpg"] == want["image"]  # every member kept, bytes unchanged
        assert sample["txt"] == f"a photo of {want['name']}".encode()
        caption = sample["caption.txt"].decode().strip()
        assert caption == caption_of(engine, want["image"])
        meta = json.loads(sample["json"])
        assert meta["caption"] == caption  # the field is added, the others kept
        assert meta["url"].endswith(f"{want['name']}.jpg")


def test_resume_never_rereads_a_written_shard(engine: Engine, tmp_path: Path) -> None:
    img2dataset_shards(tmp_path / "shards")
    out = tmp_path / "captioned"
    run(engine, input=tmp_path / "shards", output=out)
    first = (out / "00000.tar").read_bytes()
    (out / "00001.tar").unlink()  # as if killed before the second shard was written
    journal = tmp_path / ".captioned.journal.jsonl"
    lines = journal.read_bytes().splitlines(keepends=True)
    journal.write_bytes(b"".join(lines[:6]))  # ... and after its first two rows
    (tmp_path / "shards" / "00000.tar").write_bytes(b"gone")  # a reread would fail
    summary = run(engine, input=tmp_path / "shards", output=out)
    assert (summary.done, summary.failed, summary.skipped) == (1, 1, 2)
    assert (out / "00000.tar").read_bytes() == first
    with tarfile.open(out / "00001.tar") as tar:
        names = tar.getnames()
    assert sum(n.endswith(".caption.txt") for n in names) == 3


def test_a_half_written_shard_never_appears(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shard whose writing fails (disk full, a kill) is not under its final name."""
    from blipserve.batch import shards

    img2dataset_shards(tmp_path / "shards")
    dest = locate(tmp_path / "out" / "00000.tar")
    real = shards._with_caption
    calls = {"n": 0}

    def failing(*args: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real(*args)

    monkeypatch.setattr(shards, "_with_caption", failing)
    with pytest.raises(OutputError, match="No space left"):
        shards.write_shard(
            locate(tmp_path / "shards" / "00000.tar"),
            dest,
            {"000000000": "a", "000000001": "b"},
            "caption",
        )
    assert not (tmp_path / "out" / "00000.tar").exists()
    assert [p.name for p in (tmp_path / "out").iterdir()] == []


@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_each_shard_is_written_once_while_commits_run_behind(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Commits run on a writer thread while the job's thread reads on.  Resumed with the
    # second shard's rows all journaled (killed before its output was written) and the
    # first shard's not: the end of the input finishes the second shard on the job's
    # thread while a commit of the first shard's rows flushes on the writer's.  Slow
    # shard writes hold that window open: each shard must be written once, one at a time.
    import threading
    import time

    from blipserve.batch import shards

    img2dataset_shards(tmp_path / "shards", per_shard=2)
    out = tmp_path / "out"
    options = BatchOptions(
        input=tmp_path / "shards", output=out, params=PARAMS, progress=False, chunk_rows=1
    )
    BatchJob(engine, options).run()
    journal = tmp_path / ".out.journal.jsonl"
    lines = journal.read_text().splitlines(keepends=True)
    journal.write_text("".join(line for line in lines if '"00000.tar"' not in line))
    for shard in out.iterdir():
        shard.unlink()

    written: list[str] = []
    inside, most = 0, 0
    lock = threading.Lock()
    write = shards.write_shard

    def slow_write(source: Any, dest: Any, *args: Any) -> int:
        nonlocal inside, most
        with lock:
            inside += 1
            most = max(most, inside)
        time.sleep(0.3)
        try:
            return write(source, dest, *args)
        finally:
            with lock:
                inside -= 1
                written.append(dest.name)

    monkeypatch.setattr(shards, "write_shard", slow_write)
    summary = BatchJob(engine, options).run()
    assert (summary.done, summary.skipped) == (2, 3)
    assert sorted(written) == ["00000.tar", "00001.tar"]  # once each
    assert summary.written == 2
    assert most == 1
