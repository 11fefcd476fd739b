"""The Open Inference Protocol (v2) on the real server, through the real ``tritonclient.http``:
health, metadata and readiness as the client asks for them; inference with images as raw
bytes (the binary tensor data extension) and as base64 in JSON, answering what ``/score``
answers for the same images; parameters and the text input taking effect; a bad row named
in a 400 while the server goes on; and an image-text matching model's FP32 score.

The built-in ``demo`` captioner knows the scenes in examples/ (their captions are in
examples/metadata.jsonl); on photographs it says something deterministic, which both routes
must agree on.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from helpers import jpeg_bytes, photos
from testkit.live_server import RunningServer

KEY = "v2-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def auth() -> dict[str, str]:
    """The key's header, in a dict of its own for each call: tritonclient adds
    Inference-Header-Content-Length to the dict it is given, which a JSON request sent
    with the same dict then carries."""
    return dict(AUTH)


EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def example_scenes() -> dict[bytes, str]:
    """Each example scene's PNG bytes -> its true caption."""
    lines = (EXAMPLES / "metadata.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return {(EXAMPLES / r["file_name"]).read_bytes(): r["text"] for r in records}


@pytest.fixture(scope="module")
def server(server_factory: Callable[..., RunningServer]) -> RunningServer:
    return server_factory(Path("demo"), "--api-key", KEY, "--max-wait-ms", "20")


@pytest.fixture(scope="module")
def client(server: RunningServer) -> Iterator[triton.InferenceServerClient]:
    with triton.InferenceServerClient(server.url.removeprefix("http://")) as c:
        yield c


def score(
    server: RunningServer, images: list[bytes], texts: list[str] | None = None, **params: Any
) -> list[dict[str, Any]]:
    """What ``/score`` answers for ``images`` (and ``texts``)."""
    encoded = [base64.b64encode(image).decode() for image in images]
    rows: list[list[str]] = (
        [[e] for e in encoded]
        if texts is None
        else [[e, t] for e, t in zip(encoded, texts, strict=True)]
    )
    columns = ["image"] if texts is None else ["image", "text"]
    body = {"input_data": {"columns": columns, "data": rows}, "params": params}
    response = httpx.post(f"{server.url}/score", json=body, headers=AUTH, timeout=120)
    assert response.status_code == 200, response.text
    answer: list[dict[str, Any]] = response.json()
    return answer


def image_input(images: list[bytes], *, binary: bool) -> triton.InferInput:
    tensor = triton.InferInput("image", [len(images)], "BYTES")
    if binary:
        tensor.set_data_from_numpy(np.array(images, dtype=np.object_))  # raw image files
    else:
        encoded = [base64.b64encode(image) for image in images]
        tensor.set_data_from_numpy(np.array(encoded, dtype=np.object_), binary_data=False)
    return tensor


def text_input(texts: list[str]) -> triton.InferInput:
    tensor = triton.InferInput("text", [len(texts), 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[t.encode()] for t in texts], dtype=np.object_))
    return tensor


def texts_of(result: triton.InferResult, name: str = "text") -> list[str]:
    return [value.decode() for value in result.as_numpy(name).reshape(-1)]


def test_health_readiness_and_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("demo")
    assert client.is_model_ready("blipserve", model_version="1")
    assert not client.is_model_ready("someone-else")
    server = client.get_server_metadata(headers=auth())
    assert server["name"] == "blipserve"
    assert "binary_tensor_data" in server["extensions"]
    model = client.get_model_metadata("demo", headers=auth())
    assert model["name"] == "demo"
    assert model["platform"] == "blip-caption"
    assert [(t["name"], t["datatype"], t["shape"]) for t in model["inputs"]] == [
        ("image", "BYTES", [-1]),
        ("text", "BYTES", [-1]),
    ]
    assert [t["name"] for t in model["outputs"]] == ["text", "texts"]
    with pytest.raises(InferenceServerException) as missing:
        client.get_model_metadata("someone-else", headers=auth())
    assert missing.value.status() == "404"
    assert "no model 'someone-else' here" in missing.value.message()
    with pytest.raises(InferenceServerException) as keyless:
        client.get_model_metadata("demo")
    assert keyless.value.status() == "401"


def test_binary_and_json_answer_what_score_answers(
    server: RunningServer, client: triton.InferenceServerClient
) -> None:
    scenes = example_scenes()
    images = [*scenes, *(jpeg_bytes(photo) for photo in photos().values())]
    expected = [row["text"] for row in score(server, images)]
    # binary in, binary out (tritonclient's defaults: outputs come back binary unless asked)
    binary = client.infer("demo", [image_input(images, binary=True)], headers=auth())
    assert binary.get_response()["outputs"][0]["parameters"]["binary_data_size"] > 0
    assert texts_of(binary) == expected
    # base64 in JSON, the text asked for as JSON, under the alias and the version
    as_json = client.infer(
        "blipserve",
        [image_input(images, binary=False)],
        model_version="1",
        outputs=[triton.InferRequestedOutput("text", binary_data=False)],
        request_id="photos-1",
        headers=auth(),
    )
    response = as_json.get_response()
    assert response["id"] == "photos-1"
    assert response["model_name"] == "demo"
    assert response["outputs"][0]["data"] == expected
    # the demo model knows its scenes
    assert expected[: len(scenes)] == list(scenes.values())


def test_parameters_and_the_text_input_take_effect(
    server: RunningServer, client: triton.InferenceServerClient
) -> None:
    images = list(example_scenes())[:4]
    full = texts_of(client.infer("demo", [image_input(images, binary=True)], headers=auth()))
    short = texts_of(
        client.infer(
            "demo",
            [image_input(images, binary=True)],
            parameters={"max_new_tokens": 1},
            headers=auth(),
        )
    )
    assert all(len(s.split()) == 1 < len(f.split()) for s, f in zip(short, full, strict=True))
    assert short == [row["text"] for row in score(server, images, max_new_tokens=1)]
    prefixes = ["a large", "a small", "a large", "two"]
    prefixed = texts_of(
        client.infer(
            "demo", [image_input(images, binary=True), text_input(prefixes)], headers=auth()
        )
    )
    assert all(t.startswith(p) for t, p in zip(prefixed, prefixes, strict=True))
    assert prefixed == [row["text"] for row in score(server, images, prefixes)]
    several = client.infer(
        "demo",
        [image_input(images, binary=True)],
        parameters={"num_beams": 3, "num_return_sequences": 3},
        headers=auth(),
    )
    beams = several.as_numpy("texts")
    assert beams.shape == (4, 3)
    assert [row[0].decode() for row in beams] == texts_of(several)


def test_compressed_request(client: triton.InferenceServerClient) -> None:
    images = list(example_scenes())[:2]
    plain = texts_of(client.infer("demo", [image_input(images, binary=True)], headers=auth()))
    for algorithm in ("gzip", "deflate"):
        packed = client.infer(
            "demo",
            [image_input(images, binary=True)],
            request_compression_algorithm=algorithm,
            headers=auth(),
        )
        assert texts_of(packed) == plain


def test_a_bad_row_is_named_and_the_server_goes_on(
    server: RunningServer, client: triton.InferenceServerClient
) -> None:
    good = next(iter(example_scenes()))
    with pytest.raises(InferenceServerException) as bad:
        client.infer(
            "demo", [image_input([good, b"\x00not an image"], binary=True)], headers=auth()
        )
    assert bad.value.status() == "400"
    assert bad.value.message().startswith("row 1: ")
    tensor = triton.InferInput("image", [1], "FP32")
    tensor.set_data_from_numpy(np.zeros(1, dtype=np.float32))
    with pytest.raises(InferenceServerException) as wrong_type:
        client.infer("demo", [tensor], headers=auth())
    assert wrong_type.value.status() == "400"
    assert "input 'image': datatype must be 'BYTES', got 'FP32'" in wrong_type.value.message()
    answer = client.infer("demo", [image_input([good], binary=True)], headers=auth())
    assert texts_of(answer) == [example_scenes()[good]]
    assert server.proc.poll() is None


def test_matching_models_give_an_fp32_score(
    server_factory: Callable[..., RunningServer], tiny_model_dir: dict[str, Path]
) -> None:
    itm = server_factory(tiny_model_dir["blip-itm"], "--api-key", KEY)
    images = [jpeg_bytes(photo) for photo in list(photos().values())[:3]]
    texts = ["an astronaut", "a cup of coffee", "a cat"]
    expected = score(itm, images, texts)
    with triton.InferenceServerClient(itm.url.removeprefix("http://")) as client:
        model = client.get_model_metadata("blipserve", headers=auth())
        assert [(t["name"], t["datatype"]) for t in model["outputs"]] == [
            ("text", "BYTES"),
            ("score", "FP32"),
        ]
        result = client.infer(
            "blipserve", [image_input(images, binary=True), text_input(texts)], headers=auth()
        )
    scores = result.as_numpy("score")
    assert scores.dtype == np.float32
    assert scores.tolist() == pytest.approx([row["score"] for row in expected], rel=1e-6)
    assert texts_of(result) == [row["text"] for row in expected]
