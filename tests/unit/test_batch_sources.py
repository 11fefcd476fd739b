"""Batch inputs: every layout read lazily with stable ids and per-row errors."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pandas as pd
import pytest

from blipserve.batch.sources import count_rows, iter_rows
from blipserve.errors import InvalidInput
from helpers import make_image, png_bytes


def test_folder_is_recursive_case_insensitive_and_sorted(tmp_path: Path) -> None:
    for name in (
        "b.PNG",
        "a.jpeg",
        "sub/c.WebP",
        "sub/deeper/d.tiff",
        "e.Gif",
        "f.bmp",
        "notes.md",
        ".hidden.png",
        ".cache/x.png",
    ):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    rows = list(iter_rows(tmp_path))
    assert [r.id for r in rows] == [
        "a.jpeg",
        "b.PNG",
        "e.Gif",
        "f.bmp",
        "sub/c.WebP",
        "sub/deeper/d.tiff",
    ]
    assert all(r.path == str(tmp_path / r.id) for r in rows)
    assert count_rows(tmp_path) == 6


def test_catalog_csv_layout(tmp_path: Path) -> None:
    """pandas to_csv with an unnamed index and base64 with MIME line breaks, as the
    catalog's batch samples write it."""
    images = [base64.encodebytes(png_bytes(make_image(i))).decode() for i in range(3)]
    assert "\n" in images[0]
    folder = tmp_path / "inputs"
    folder.mkdir()
    pd.DataFrame({"image": images[:2]}).to_csv(folder / "part-0.csv")
    pd.DataFrame({"image": images[2:], "text": ["what is it?"]}, index=[7]).to_csv(
        folder / "part-1.csv"
    )
    rows = list(iter_rows(folder))
    assert [r.id for r in rows] == ["part-0.csv:0", "part-0.csv:1", "part-1.csv:0"]
    assert [r.row for r in rows] == ["0", "1", "7"]  # the pandas index value
    assert [r.source for r in rows] == ["part-0.csv", "part-0.csv", "part-1.csv"]
    assert rows[0].image == images[0].strip()
    assert rows[2].text == "what is it?"
    assert count_rows(folder) is None  # tables: unknown without reading them


def test_jsonl_parquet_and_list_with_relative_paths(tmp_path: Path) -> None:
    make_image(0).save(tmp_path / "a.png")
    (tmp_path / "rows.jsonl").write_text(
        json.dumps({"image": "a.png", "text": "q"})
        + "\n\n"
        + "{broken\n"
        + json.dumps({"text": "no image"})
        + "\n"
        + json.dumps([1])
        + "\n"
    )
    rows = list(iter_rows(tmp_path / "rows.jsonl"))
    assert rows[0].path == str(tmp_path / "a.png")
    assert rows[0].text == "q"
    assert [r.id for r in rows] == ["rows.jsonl:0", "rows.jsonl:2", "rows.jsonl:3", "rows.jsonl:4"]
    assert "not valid JSON" in (rows[1].error or "")
    assert rows[2].error == "'image' is missing"
    assert rows[3].error == "not a JSON object"

    pd.DataFrame({"image": ["a.png", "https://example.com/x.jpg"], "text": [None, "t"]}).to_parquet(
        tmp_path / "rows.parquet"
    )
    rows = list(iter_rows(tmp_path / "rows.parquet"))
    assert [r.path for r in rows] == [str(tmp_path / "a.png"), None]
    assert rows[1].image == "https://example.com/x.jpg"

    (tmp_path / "list.txt").write_text("# images\na.png\n\nhttps://example.com/y.png\n")
    rows = list(iter_rows(tmp_path / "list.txt"))
    assert [r.id for r in rows] == ["list.txt:1", "list.txt:3"]
    assert count_rows(tmp_path / "list.txt") == 2


def test_bad_csv_rows_are_rows_with_errors(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text("image,text\nx.png,a,extra\n,b\n")
    rows = list(iter_rows(tmp_path / "t.csv"))
    assert rows[0].error == "has 3 fields but the header has 2"
    assert rows[1].error == "'image' is missing"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("text\nhello\n", "no 'image' column"),
    ],
)
def test_unusable_tables_are_refused(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "t.csv").write_text(content)
    with pytest.raises(InvalidInput, match=message):
        list(iter_rows(tmp_path / "t.csv"))


def test_missing_input_and_unknown_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="does not exist"):
        list(iter_rows(tmp_path / "nope"))
    (tmp_path / "x.docx").write_text("x")
    with pytest.raises(InvalidInput, match="unknown kind of file"):
        list(iter_rows(tmp_path / "x.docx"))


def test_linked_images_are_inputs_and_linked_folders_are_not(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    make_image(0).save(tmp_path / "elsewhere" / "a.png")
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a.png").symlink_to(tmp_path / "elsewhere" / "a.png")
    (folder / "loop").symlink_to(folder)
    (folder / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    assert [r.id for r in iter_rows(folder)] == ["a.png"]
