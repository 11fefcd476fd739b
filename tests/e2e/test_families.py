"""InstructBLIP and BLIP-2's image-text matching as users run them: the `blipserve` command
(caption, ask, match, batch with a BLIP-2 filter) and the real server (catalog ``/score``,
the `openai` client streaming a chat), on tiny random models saved with ``save_pretrained``.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

import tiny_models
from blipserve.models.instructblip import InstructBlipAdapter
from helpers import make_image, run_cli
from live_server import OPENAI_KEY, RunningServer, openai_client_of

INSTRUCTBLIP = ("instructblip-vicuna", "instructblip-t5")
SHORT = ["--max-new-tokens", "5", "--dtype", "float32"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {kind: tiny_models.build(kind, root / kind) for kind in (*INSTRUCTBLIP, "blip2-itm")}


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("images") / "photo.jpg"
    make_image(4, (320, 240)).save(path, quality=90)
    return path


def answer_of(*args: str) -> str:
    out = run_cli(*args)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.parametrize("kind", INSTRUCTBLIP)
def test_instructblip_caption_and_ask(folders: dict[str, Path], image: Path, kind: str) -> None:
    model = ["--model", str(folders[kind]), *SHORT]
    caption = answer_of("caption", str(image), *model)
    assert caption
    # `ask` puts the question in LAVIS's template, as the adapter's question_prompt does
    question = InstructBlipAdapter.question_prompt("what is it?")
    asked = answer_of("ask", str(image), "what is it?", *model)
    assert asked == answer_of("caption", str(image), "--prompt", question, *model)
    several = answer_of(
        "caption", str(image), *model, "--num-beams", "3", "--num-return-sequences", "3"
    )
    assert len(several.splitlines()) == 3  # (their order: tests/unit/test_several_texts.py)


def test_blip2_match_and_batch_filter(
    folders: dict[str, Path], tiny_model_dir: dict[str, Path], image: Path, tmp_path: Path
) -> None:
    itm = ["--model", str(folders["blip2-itm"]), "--dtype", "float32"]
    scores = [float(answer_of("match", str(image), text, *itm)) for text in ("a cat", "a car")]
    assert all(0.0 <= s <= 1.0 for s in scores)
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        make_image(i, (320, 240)).save(photos / f"p{i}.jpg")
    output = tmp_path / "captions.jsonl"
    out = run_cli(
        "batch",
        str(photos),
        "-o",
        str(output),
        "--model",
        str(tiny_model_dir["blip-caption"]),
        "--filter-model",
        str(folders["blip2-itm"]),
        *SHORT,
    )
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(rows) == 3
    for row in rows:
        assert not row["error"]
        assert 0.0 <= row["score"] <= 1.0
        assert row["keep"] == (row["score"] >= 0.5)  # the default --min-match
    # the filter's score is the BLIP-2 ITM's for that caption, as `match` gives it
    first = rows[0]
    matched = answer_of("match", str(photos / first["id"]), first["text"], *itm)
    assert float(matched) == pytest.approx(first["score"], abs=1e-4)


@pytest.fixture(scope="module")
def instructblip_server(
    server_factory: Callable[..., RunningServer], folders: dict[str, Path]
) -> RunningServer:
    model = folders["instructblip-vicuna"]
    return server_factory(model, "--api-key", OPENAI_KEY, "--dtype", "float32")


def test_instructblip_server_score_and_streamed_chat(
    instructblip_server: RunningServer, folders: dict[str, Path], image: Path
) -> None:
    encoded = base64.encodebytes(image.read_bytes()).decode()  # as catalog clients write it
    body = {"input_data": {"columns": ["image"], "data": [[encoded]]}}
    body["params"] = {"max_new_tokens": 5}
    headers = {"Authorization": f"Bearer {OPENAI_KEY}"}
    url = f"{instructblip_server.url}/score"
    response = httpx.post(url, json=body, headers=headers, timeout=60)
    assert response.status_code == 200, response.text
    model = ["--model", str(folders["instructblip-vicuna"]), *SHORT]
    assert response.json() == [{"text": answer_of("caption", str(image), *model)}]

    client = openai_client_of(instructblip_server)
    url = f"data:image/jpeg;base64,{base64.b64encode(image.read_bytes()).decode()}"
    messages: Any = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": "What is unusual here?"},
            ],
        }
    ]
    greedy: Any = {"max_tokens": 12, "temperature": 0, "extra_body": {"min_tokens": 12}}
    whole = client.chat.completions.create(model="instructblip", messages=messages, **greedy)
    chunks = client.chat.completions.create(
        model="instructblip", messages=messages, stream=True, **greedy
    )
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == whole.choices[0].message.content
    assert len([p for p in pieces if p]) > 1
