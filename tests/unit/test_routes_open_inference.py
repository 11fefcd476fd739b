"""The Open Inference Protocol's routes (/v2) in process, no socket: health and readiness,
the key, errors as ``{"error": ...}`` with blipserve's statuses, body types and encodings,
deadlines, model names and metrics labels.

The app is ``create_app``'s, around an engine over :class:`fakes.EchoAdapter`; the real
server and the real ``tritonclient`` are in tests/integration/test_open_inference.py.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from starlette.testclient import TestClient

from blipserve.errors import Overloaded
from fakes import EchoAdapter, EchoApps
from helpers import b64_png

KEY = "test-key-1"
AUTH = {"Authorization": f"Bearer {KEY}"}
MODEL = "echo-model"
INFER = f"/v2/models/{MODEL}/infer"
AppFactory = Callable[..., FastAPI]


def infer_body(*texts: str, **fields: Any) -> dict[str, Any]:
    n = len(texts)
    images = [b64_png(i) for i in range(n)]
    inputs = [
        {"name": "image", "datatype": "BYTES", "shape": [n], "data": images},
        {"name": "text", "datatype": "BYTES", "shape": [n], "data": list(texts)},
    ]
    return {"inputs": inputs, **fields}


@pytest.fixture
def model() -> EchoAdapter:
    return EchoAdapter()


@pytest.fixture
def make_app(model: EchoAdapter) -> Iterator[AppFactory]:
    """``make_app(load=True, name=MODEL, **server_config)``: an app over the echo model."""
    apps = EchoApps(
        model, MODEL, api_keys=(KEY,), max_body_bytes=300_000, max_wait_ms=0, warmup=False
    )
    yield apps.make
    apps.close()


@pytest.fixture
def client(make_app: AppFactory) -> TestClient:
    return TestClient(make_app(), headers=AUTH)


def test_infer_answers_each_row_in_order(client: TestClient, model: EchoAdapter) -> None:
    response = client.post(INFER, json=infer_body("a", "b", "c", id="r-1"))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {
        "model_name": MODEL,
        "model_version": "1",
        "id": "r-1",
        "outputs": [
            {
                "name": "text",
                "datatype": "BYTES",
                "shape": [3],
                "data": ["echo a", "echo b", "echo c"],
            }
        ],
    }
    assert model.batches == [["a", "b", "c"]]


def test_not_ready_until_loaded(make_app: AppFactory) -> None:
    client = TestClient(make_app(load=False), headers=AUTH)
    assert client.get("/v2/health/live").json() == {"live": True}
    for path in ("/v2/health/ready", f"/v2/models/{MODEL}/ready", f"/v2/models/{MODEL}"):
        response = client.get(path)
        assert response.status_code == 503, path
        assert response.headers["retry-after"] == "5"
        assert response.json() == {"error": "not ready: the model is still loading"}
    assert client.post(INFER, json=infer_body("a")).status_code == 503


def test_health_and_readiness_are_open_metadata_and_infer_need_the_key(
    make_app: AppFactory,
) -> None:
    anyone = TestClient(make_app())
    for path in ("/v2/health/live", "/v2/health/ready", f"/v2/models/{MODEL}/ready"):
        assert anyone.get(path).status_code == 200, path
    for response in (
        anyone.get("/v2"),
        anyone.get(f"/v2/models/{MODEL}"),
        anyone.post(INFER, json=infer_body("a")),
        anyone.post(INFER, json=infer_body("a"), headers={"Authorization": "Bearer nope"}),
    ):
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"
        assert set(response.json()) == {"error"}


def test_model_names_and_versions(make_app: AppFactory) -> None:
    client = TestClient(make_app(name="org/echo"), headers=AUTH)
    for name in ("org/echo", "blipserve"):
        for version in ("", "/versions/1"):
            prefix = f"/v2/models/{name}{version}"
            assert client.get(prefix).json()["name"] == "org/echo"
            assert client.get(f"{prefix}/ready").json() == {"name": "org/echo", "ready": True}
            answer = client.post(f"{prefix}/infer", json=infer_body("x"))
            assert answer.json()["outputs"][0]["data"] == ["echo x"], prefix
    missing = client.post("/v2/models/echo/infer", json=infer_body("x"))
    assert missing.status_code == 404
    assert missing.json() == {
        "error": "no model 'echo' here: this server serves 'org/echo' (or 'blipserve')"
    }
    assert client.get("/v2/models/blipserve/versions/2/ready").status_code == 404


@pytest.mark.parametrize(
    ("kwargs", "status", "message"),
    [
        (
            {"json": infer_body("a", parameters={"num_return_sequences": 2, "num_beams": 2})},
            400,
            "the echo model gives one text per row",  # the adapter's check_params
        ),
        ({"json": infer_body("a", outputs=[{"name": "score"}])}, 400, "not 'score'"),
        ({"json": infer_body("a", "b", "c", "d", "e")}, 400, "at most 4 per request"),
        ({"content": b"{", "headers": {"Content-Type": "application/json"}}, 400, "not valid JSON"),
        ({"content": b"hello", "headers": {"Content-Type": "text/plain"}}, 415, "got 'text/plain'"),
        (
            {"content": b"{}", "headers": {"Content-Encoding": "br"}},
            415,
            "Content-Encoding 'br' is not supported",
        ),
        (
            {"content": b"not gzip", "headers": {"Content-Encoding": "gzip"}},
            400,
            "the body is not valid gzip data",
        ),
        (
            {"content": gzip.compress(b"{}")[:-9], "headers": {"Content-Encoding": "gzip"}},
            400,
            "the gzip body ends before its compressed data does",
        ),
        (
            {"content": gzip.compress(b"{}") * 2, "headers": {"Content-Encoding": "gzip"}},
            400,
            "the gzip body has 22 bytes after its compressed data: send one stream",
        ),
        (
            {"content": gzip.compress(b" " * 400_000), "headers": {"Content-Encoding": "gzip"}},
            413,
            "larger than the limit of 300000 bytes once decompressed",
        ),
        ({"content": b"x" * 400_000}, 413, "the limit is 300000 bytes"),
        (
            {"content": b"{}", "headers": {"Inference-Header-Content-Length": "9"}},
            400,
            "Inference-Header-Content-Length is 9 but the body has 2 bytes",
        ),
    ],
)
def test_infer_errors(
    make_app: AppFactory,
    model: EchoAdapter,
    kwargs: dict[str, Any],
    status: int,
    message: str,
) -> None:
    client = TestClient(make_app(max_rows=4), headers=AUTH)
    response = client.post(INFER, **kwargs)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    assert model.batches == []  # refused before the model


def test_a_bad_row_is_named_and_the_rest_of_the_server_goes_on(client: TestClient) -> None:
    body = infer_body("a", "b")
    body["inputs"][0]["data"][1] = "@@@"
    response = client.post(INFER, json=body)
    assert response.status_code == 400
    assert response.json() == {
        "error": "row 1: image is not valid base64: unexpected character '@'"
    }
    assert client.post(INFER, json=infer_body("c")).status_code == 200


def test_a_model_fault_is_500_and_fails_only_that_request(client: TestClient) -> None:
    broken = client.post(INFER, json=infer_body("boom"))
    assert broken.status_code == 500
    assert broken.json() == {"error": "the model failed on this batch: boom"}
    assert client.post(INFER, json=infer_body("fine")).status_code == 200


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_compressed_bodies(client: TestClient, encoding: str) -> None:
    raw = json.dumps(infer_body("zip")).encode()
    packed = gzip.compress(raw) if encoding == "gzip" else zlib.compress(raw)
    response = client.post(INFER, content=packed, headers={"Content-Encoding": encoding})
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["data"] == ["echo zip"]


def test_the_clients_timeout_shortens_the_deadline(client: TestClient, model: EchoAdapter) -> None:
    model.hold()  # the row waits for the model past its 50 ms
    response = client.post(INFER, json=infer_body("slow", parameters={"timeout": 50_000}))
    model.release()
    assert response.status_code == 504
    assert "deadline" in response.json()["error"]


def test_a_full_queue_is_503_with_retry_after(
    make_app: AppFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = make_app(max_queue=2)
    client = TestClient(app, headers=AUTH)

    def full(rows: int) -> None:  # as the queue answers when other requests fill it
        raise Overloaded("the queue is full (2 of 2 rows waiting); retry shortly")

    monkeypatch.setattr(app.state.blipserve.online.queue, "refuse_if_full", full)
    response = client.post(INFER, json=infer_body("a"))
    assert response.status_code == 503
    assert "retry-after" in response.headers
    assert response.json() == {"error": "the queue is full (2 of 2 rows waiting); retry shortly"}
    bigger = client.post(INFER, json=infer_body("a", "b", "c"))
    assert bigger.status_code == 400
    assert "queues at most 2 rows" in bigger.json()["error"]


def test_a_request_id_too_long_is_431_in_each_routes_format(client: TestClient) -> None:
    too_long = {"x-request-id": "i" * 101}
    v2 = client.post(INFER, json=infer_body("a"), headers=too_long)
    assert v2.status_code == 431
    assert "request id headers" in v2.json()["error"]
    score = client.post("/score", json={}, headers=too_long)
    assert score.status_code == 431
    assert "request id headers" in score.json()["message"]


def test_metrics_label_model_routes_by_template(client: TestClient) -> None:
    client.post(INFER, json=infer_body("a"))
    client.post("/v2/models/some/hub-id/versions/7/infer", json=infer_body("a"))
    client.get("/v2/models/a-name-nobody-serves/ready")
    client.get("/v2/health/live")
    lines = [
        line
        for line in client.get("/metrics").text.splitlines()
        if line.startswith("blipserve_requests_total{")
    ]
    routes = {line.split('route="')[1].split('"')[0] for line in lines}
    assert routes == {
        "/v2/models/{name}/infer",
        "/v2/models/{name}/ready",
        "/v2/health/live",
    }
    assert any('route="/v2/models/{name}/infer",status="404"' in line for line in lines)
