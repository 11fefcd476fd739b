"""A row's result (RowResult) as the journal keeps it, as CapFilt scores it and as Ray's
actors send it: journals written by earlier versions resume, byte for byte."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from blipserve.batch.book import ShardEnd
from blipserve.batch.journal import Journal, result_line, result_of_line
from blipserve.batch.rows import InputRow, RowResult
from blipserve.errors import InferenceError, RowError
from blipserve.types import Prediction

SIGNATURE = {
    "input": "/data/web.csv",
    "model": "/models/blip-caption",
    "params": {"max_new_tokens": 4, "num_beams": 3, "num_return_sequences": 3},
    "prompt": None,
    "filter": "/models/blip-itm",
    "min_match": 0.5,
}
# Lines as the previous version (records as dicts) wrote them: every kind of row.
OLD_LINES = [
    b'{"id": "broken.png", "text": "", "score": null, "error": "image data is truncated or '
    b'corrupt: the header cannot be parsed", "source": "broken.png", "row": null, "path": '
    b'"/data/images/broken.png"}\n',
    b'{"id": "img0.png", "text": "darling maestrogat edges", "score": null, "error": "", '
    b'"source": "img0.png", "row": null, "path": "/data/images/img0.png"}\n',
    b'{"id": "img1.png", "text": "sock locality libretto", "score": null, "error": "", '
    b'"texts": ["sock locality libretto", "sock locality", "sock"], "source": "img1.png", '
    b'"row": null, "path": "/data/images/img1.png"}\n',
    b'{"id": "web.csv:0", "text": "a dog contested", "score": 0.491548, "error": "", '
    b'"source": "web.csv", "row": "0", "path": "/data/web/0.png", "text_in": "a dog", '
    b'"text_in_score": 0.491839, "text_in_keep": true, "keep": true}\n',
    b'{"id": "web.csv:1", "text": "darling edges", "score": 0.492607, "error": "", '
    b'"source": "web.csv", "row": "1", "path": "/data/web/1.png", "keep": false}\n',
    b'{"id": "web.csv:2", "text": "b caption", "score": 0.7, "error": "", "texts": '
    b'["b caption", "a caption"], "source": "web.csv", "row": "2", "path": "/data/web/2.png", '
    b'"text_in": "a cat", "text_in_score": 0.2, "text_in_keep": false, "keep": true, '
    b'"text_scores": [0.7, 0.6]}\n',
    b'{"id": "web.csv:3", "text": "c", "score": 0.4, "error": "", "texts": [], "source": '
    b'"web.csv", "row": "3", "path": "/data/web/3.png", "keep": false, "text_scores": []}\n',
    b'{"id": "web.csv:4", "text": "d", "score": null, "error": "matching failed: boom", '
    b'"source": "web.csv", "row": "4", "path": "/data/web/4.png", "text_in": "\xc3\xa9t\xc3\xa9", '
    b'"text_in_score": 0.3, "text_in_keep": false}\n',
    b'{"id": "000000000", "text": "a photo", "score": 0.49, "error": "", "source": "00000.tar", '
    b'"row": null, "path": null, "text_in": "alt", "text_in_score": 0.5, "text_in_keep": true, '
    b'"keep": false}\n',
]


def test_a_journal_written_by_the_previous_version_resumes(tmp_path: Path) -> None:
    path = tmp_path / ".out.jsonl.journal.jsonl"
    header = b'{"signature": ' + _json(SIGNATURE) + b"}\n"
    path.write_bytes(header + b"".join(OLD_LINES) + OLD_LINES[1][:20])  # and a torn line
    journal = Journal(path, SIGNATURE)
    done = journal.open(overwrite=False)
    assert done == {
        "broken.png": False,
        "img0.png": True,
        "img1.png": True,
        **{f"web.csv:{n}": n != 4 for n in range(5)},
        "000000000": True,
    }
    journal.close()
    results = list(journal.records())
    # every line loads, typed, and is written again byte for byte
    assert b"".join(result_line(r) for r in results) == b"".join(OLD_LINES)
    assert path.read_bytes() == header + b"".join(OLD_LINES)  # (the torn line dropped)
    broken, img0, img1, dog, darling, several, none_kept, failed, sample = results
    assert broken.error.startswith("image data is truncated")
    assert broken.caption() is None
    assert img0 == RowResult(
        "img0.png", "darling maestrogat edges", source="img0.png", path="/data/images/img0.png"
    )
    assert img1.texts == ("sock locality libretto", "sock locality", "sock")
    assert (dog.text_in, dog.text_in_score, dog.text_in_keep, dog.keep) == (
        "a dog",
        0.491839,
        True,
        True,
    )
    assert (darling.keep, darling.text_in, darling.caption()) == (False, None, None)
    assert several.texts == ("b caption", "a caption")
    assert several.text_scores == (0.7, 0.6)
    assert (none_kept.texts, none_kept.text_scores) == ((), ())
    assert (failed.text_in, failed.text_in_keep, failed.caption()) == ("été", False, None)
    assert (sample.source, sample.path, sample.caption()) == ("00000.tar", None, "alt")


def test_a_journal_line_round_trips() -> None:
    for line in OLD_LINES:
        result = result_of_line(line)
        assert result is not None
        assert result_line(result) == line
    assert result_of_line(b'{"signature": {}}\n') is None
    assert result_of_line(b'{"id": "x", "te') is None  # torn


def test_results_are_built_alike_from_any_outcome() -> None:
    row = InputRow("t.csv:3", "a.png", path="/a.png", source="t.csv", row="3")
    several = RowResult.of(row, Prediction("best", texts=("best", "next")))
    assert several == RowResult(
        "t.csv:3", "best", texts=("best", "next"), source="t.csv", row="3", path="/a.png"
    )
    assert RowResult.of(row, RowError(0, "no such file", row.id)).error == "no such file"
    assert RowResult.of(row, InferenceError("out of memory")) == RowResult.failed(
        row, "out of memory"
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        several.text = "changed"  # type: ignore[misc]


def test_shard_messages_carry_the_end_of_a_shard_in_its_own_column() -> None:
    pytest.importorskip("pyarrow")
    from blipserve.batch.ray import shard_messages

    results = [result_of_line(line) for line in OLD_LINES[-2:]]
    table = shard_messages([r for r in results if r is not None])
    assert table.column_names == ["record", "end_of_shard"]
    assert table.column("end_of_shard").to_pylist() == [None, None]
    assert [result_of_line(x) for x in table.column("record").to_pylist()] == results
    end = shard_messages(end=ShardEnd("00001.tar", rows=4, skipped=1, written=True))
    assert end.schema == table.schema  # every message alike, whatever it carries
    assert end.column("record").to_pylist() == [None]
    [fields] = end.column("end_of_shard").to_pylist()
    assert ShardEnd(**fields) == ShardEnd("00001.tar", 4, 1, True)


def _json(value: object) -> bytes:
    import json

    return json.dumps(value, ensure_ascii=False).encode()
