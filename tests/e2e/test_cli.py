"""The `blipserve` command as a user runs it: a real subprocess on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import b64_png, make_image, run_cli

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_help_teaches() -> None:
    out = run_cli("caption", "--help")
    assert out.returncode == 0
    text_seen = " ".join(out.stdout.split())  # argparse wraps lines to the terminal width
    for text in (
        "--model",
        "--device",
        "--dtype",
        "--prompt",
        "--max-new-tokens",
        "--allow-url-host",
        "(default: 'demo')",
        "examples:",
    ):
        assert text in text_seen


@pytest.mark.parametrize("columns", [["image"], ["image", "text"]])
def test_score_catalog_request(
    tiny_model_dir: dict[str, Path], tmp_path: Path, columns: list[str]
) -> None:
    data = [
        [b64_png(i, lines=True)] + (["a picture of"] if len(columns) == 2 else []) for i in range(3)
    ]
    body = {
        "input_data": {"columns": columns, "index": [0, 1, 2], "data": data},
        "params": {"max_new_tokens": 5},
    }
    request = tmp_path / "request.json"
    request.write_text(json.dumps(body))
    out = run_cli("score", str(request), "--model", str(tiny_model_dir["blip-caption"]))
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    assert isinstance(answer, list)
    assert len(answer) == 3
    for item in answer:
        assert set(item) == {"text"}
        assert isinstance(item["text"], str)
        assert item["text"]
        if len(columns) == 2:
            assert item["text"].startswith("a picture of")


def test_score_from_stdin_validates_cli_options(tiny_model_dir: dict[str, Path]) -> None:
    body = json.dumps({"input_data": {"columns": ["image"], "data": [[b64_png(0)]]}})
    out = run_cli(
        "score",
        "-",
        "--model",
        str(tiny_model_dir["blip-caption"]),
        "--max-new-tokens",
        "0",
        stdin=body,
    )
    assert out.returncode == 2
    assert "generation options.max_new_tokens: Input should be greater than" in out.stderr


def test_score_bad_row_names_it(tiny_model_dir: dict[str, Path], tmp_path: Path) -> None:
    body = {"input_data": {"columns": ["image"], "data": [[b64_png(0)], ["not-base64!"]]}}
    request = tmp_path / "request.json"
    request.write_text(json.dumps(body))
    out = run_cli("score", str(request), "--model", str(tiny_model_dir["blip-caption"]))
    assert out.returncode == 2
    assert out.stderr.startswith("blipserve: error: row 1: ")
    assert "Traceback" not in out.stderr


def test_caption_files_and_a_bad_one(tiny_model_dir: dict[str, Path], tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    make_image(3).save(good)
    bad = tmp_path / "bad.png"
    bad.write_text("<html>not an image</html>")
    out = run_cli(
        "caption",
        str(good),
        str(bad),
        str(tmp_path / "missing.jpg"),
        "--json",
        "--model",
        str(tiny_model_dir["blip-caption"]),
        "--max-new-tokens",
        "4",
    )
    assert out.returncode == 2
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert [line["image"] for line in lines] == [str(good), str(bad), str(tmp_path / "missing.jpg")]
    assert lines[0]["text"]
    assert "not a recognised image" in lines[1]["error"]
    assert "missing.jpg" in lines[2]["error"]


def test_ask_and_match(tiny_model_dir: dict[str, Path], tmp_path: Path) -> None:
    image = tmp_path / "x.png"
    make_image(4).save(image)
    out = run_cli(
        "ask",
        str(image),
        "what is it?",
        "--model",
        str(tiny_model_dir["blip-vqa"]),
        "--max-new-tokens",
        "3",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()
    out = run_cli("match", str(image), "a dog", "--model", str(tiny_model_dir["blip-itm"]))
    assert out.returncode == 0, out.stderr
    assert 0.0 <= float(out.stdout) <= 1.0


def test_unknown_model_is_one_clear_line() -> None:
    out = run_cli("caption", "x.png", "--model", "Salesforce/blipserve-no-such-model")
    assert out.returncode == 1
    assert "is not a local folder" in out.stderr
    assert "Traceback" not in out.stderr


def test_batch_input_that_is_not_there_fails_before_the_model_loads(tmp_path: Path) -> None:
    """A missing input (or a pattern's first shard) is named at once: the model, which
    here does not exist either, is not even loaded."""
    model = "Salesforce/blipserve-no-such-model"
    for where in (tmp_path / "no-photos", tmp_path / "shards" / "{00000..00003}.tar"):
        out = run_cli("batch", str(where), "-o", str(tmp_path / "out.jsonl"), "--model", model)
        assert out.returncode == 2, out.stderr
        assert "does not exist" in out.stderr
        assert "no-photos" in out.stderr or "00000.tar" in out.stderr
        assert "is not a local folder" not in out.stderr


def test_batch_max_failures_from_the_command_line_stops_with_status_3(tmp_path: Path) -> None:
    """``--max-failures`` as typed (it crashed once: the settings turned its value into a
    dict on the way to the job)."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("scene-01.png", "scene-02.png"):
        (photos / name).write_bytes((EXAMPLES / name).read_bytes())
    for k in range(3):
        (photos / f"broken-{k}.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    out = run_cli("batch", str(photos), "-o", str(tmp_path / "out.jsonl"), "--max-failures", "2")
    assert out.returncode == 3, out.stderr
    assert "more than --max-failures 2" in out.stderr
    assert "Traceback" not in out.stderr
    out = run_cli("batch", str(photos), "-o", str(tmp_path / "ok.jsonl"), "--max-failures", "60%")
    assert out.returncode == 0, out.stderr
    assert "done 2, failed 3" in out.stderr
