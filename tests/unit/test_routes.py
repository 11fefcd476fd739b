"""The app's routes in process, no socket: errors and their statuses, limits, auth, headers,
readiness, metrics, OpenAPI, ``/v1/models``, deadlines and disconnects (the chat route:
test_routes_openai.py).

The app is built by ``create_app`` around an engine over :class:`fakes.EchoAdapter`, loaded
by hand (``ServerState.load``) or by the app's lifespan.  Timing tests run on
:class:`fakes.VirtualTimeLoop`: the request's deadline, on the loop's clock, passes when the
test moves that clock.  What needs a real socket (a client closing its connection, uvicorn,
SIGTERM) stays in tests/integration/test_server.py.
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from starlette.testclient import TestClient
from starlette.types import Message

from blipserve.config import ModelConfig, ServerConfig, Settings
from blipserve.engine import Engine
from blipserve.errors import Overloaded
from blipserve.server.app import create_app
from fakes import EchoAdapter, EchoApps, VirtualTimeLoop, run_on_virtual_time, state_of
from helpers import b64_png, score_body

KEY = "test-key-1"
AUTH = {"Authorization": f"Bearer {KEY}"}
MODEL = "echo-model"
ServerFactory = Callable[..., FastAPI]


def texts(*texts: str) -> dict[str, Any]:
    return score_body([[b64_png(i), t] for i, t in enumerate(texts)], ["image", "text"])


@pytest.fixture
def model() -> EchoAdapter:
    return EchoAdapter()  # (released by the fixtures that run it)


@pytest.fixture
def make_app(model: EchoAdapter) -> Iterator[ServerFactory]:
    """``make_app(load=True, **server_config)``: an app over the echo model, loaded unless
    ``load`` is false; its queue is stopped at the end of the test."""
    apps = EchoApps(
        model,
        MODEL,
        api_keys=(KEY, "second-key"),
        max_body_bytes=300_000,
        max_wait_ms=0,
        warmup=False,
    )
    yield apps.make
    apps.close()


@pytest.fixture
def app(make_app: ServerFactory) -> FastAPI:
    return make_app()


@pytest.fixture
def client(app: FastAPI) -> TestClient:
    return TestClient(app, headers=AUTH)


# -- health and readiness ------------------------------------------------------------------


def test_health_routes_are_open(app: FastAPI) -> None:
    open_client = TestClient(app)
    live = open_client.get("/")
    assert (live.status_code, live.text) == (200, "Healthy")
    ready = open_client.get("/ready")
    assert ready.status_code == 200
    assert ready.json() == {
        "status": "ready",
        "model": MODEL,
        "kind": "echo",
        "build": [{"step": "echo", "runs_on": "python", "applied": True}],
    }


def test_not_ready_until_loaded(make_app: ServerFactory) -> None:
    client = TestClient(make_app(load=False), headers=AUTH)
    ready = client.get("/ready")
    assert ready.status_code == 503
    assert ready.headers["retry-after"] == "5"
    assert ready.json() == {"message": "not ready: the model is still loading"}
    scored = client.post("/score", json=texts("a"))
    assert scored.status_code == 503
    assert client.get("/").status_code == 200  # alive, though not ready
    assert client.get("/v1/models").status_code == 200


def test_a_failed_load_is_told_by_ready(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    app = create_app(Settings(model=ModelConfig(model=str(missing))))
    state = state_of(app)
    failed = threading.Event()
    state.on_load_failure = failed.set  # (blipserve serve stops the server then)
    state.load()
    assert failed.is_set()
    ready = TestClient(app).get("/ready")
    assert ready.status_code == 503
    assert ready.json()["message"].startswith(f"not ready: model '{missing}': no such folder")


def test_the_lifespan_loads_the_model_and_stops_the_queue(model: EchoAdapter) -> None:
    settings = Settings(server=ServerConfig(warmup=True, max_wait_ms=0))
    app = create_app(settings, engine=Engine(model))
    with TestClient(app) as client:
        for thread in threading.enumerate():  # (on an idle machine it may be done already)
            if thread.name == "blipserve-load":
                thread.join(10)
        assert client.get("/ready").status_code == 200
        assert client.post("/score", json=texts("a")).json() == [{"text": "echo a"}]
    online = state_of(app).online
    assert online is not None
    with pytest.raises(Overloaded, match="shutting down"):
        online.queue.refuse_if_full(1)
    assert model.batches[0] == [None]  # the warm-up image, before any request


# -- /score ----------------------------------------------------------------------------------


def test_score_answers_each_row_in_order(client: TestClient, model: EchoAdapter) -> None:
    response = client.post("/score", json=texts("a", "b", "c"))
    assert response.status_code == 200
    assert response.json() == [{"text": "echo a"}, {"text": "echo b"}, {"text": "echo c"}]
    assert model.batches == [["a", "b", "c"]]


@pytest.mark.parametrize(
    ("kwargs", "status", "message"),
    [
        ({"json": score_body([[b64_png(0)], ["@@@"]])}, 400, "row 1: image is not valid base64"),
        ({"json": {"input": []}}, 400, "no 'input_data' key"),
        ({"json": score_body([[b64_png(0)]], beams=2)}, 400, "unknown parameter(s) 'beams'"),
        ({"content": b"{", "headers": {"Content-Type": "application/json"}}, 400, "not valid JSON"),
        ({"content": b"hello", "headers": {"Content-Type": "text/plain"}}, 415, "must be JSON"),
        ({"content": b"{}"}, 415, "no Content-Type"),
        ({"json": score_body([["A" * 400_000]])}, 413, "limit is 300000 bytes"),
    ],
)
def test_score_errors(
    client: TestClient, model: EchoAdapter, kwargs: dict[str, Any], status: int, message: str
) -> None:
    response = client.post("/score", **kwargs)
    assert response.status_code == status
    assert message in response.json()["message"]
    assert model.batches == []  # refused before the model


def test_chunked_body_over_the_limit_is_413(client: TestClient) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(40):
            yield b"x" * 10_000

    response = client.post("/score", content=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert "larger than the limit of 300000 bytes" in response.json()["message"]


def test_too_many_rows_is_400(make_app: ServerFactory) -> None:
    client = TestClient(make_app(max_rows=2), headers=AUTH)
    response = client.post("/score", json=texts("a", "b", "c"))
    assert response.status_code == 400


def test_a_model_fault_fails_only_that_request(client: TestClient) -> None:
    broken = client.post("/score", json=texts("boom"))
    assert broken.status_code == 500
    assert broken.json() == {"message": "the model failed on this batch: boom"}
    assert client.post("/score", json=texts("fine")).status_code == 200


def test_a_request_larger_than_the_queue_gets_400_before_decoding(
    make_app: ServerFactory,
) -> None:
    app = make_app(max_queue=2)
    client = TestClient(app, headers=AUTH)
    response = client.post("/score", json=texts("a", "b", "c"))
    assert response.status_code == 400  # not 503: retrying could never help
    assert "3 rows; this server queues at most 2 rows at once" in response.json()["message"]
    assert "blipserve_decode_seconds_count 0.0" in client.get("/metrics").text


# -- auth, headers, unknown routes --------------------------------------------------------


@pytest.mark.parametrize("path", ["/score", "/v1/models", "/metrics"])
def test_auth_required(app: FastAPI, path: str) -> None:
    client = TestClient(app)
    method = "POST" if path == "/score" else "GET"
    missing, wrong, basic, second = (
        client.request(method, path, json=texts("a"), headers=headers)
        for headers in (
            {},
            {"Authorization": "Bearer nope"},
            {"Authorization": "Basic dGVzdA=="},
            {"Authorization": "Bearer second-key"},
        )
    )
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == "Bearer"
    assert "missing API key" in missing.json()["message"]
    assert wrong.status_code == 401
    assert wrong.json() == {"message": "wrong API key"}
    assert basic.status_code == 401
    assert second.status_code == 200


def test_request_id_headers(client: TestClient) -> None:
    given = client.post(
        "/score",
        json=texts("a"),
        headers={"x-request-id": "abc-123", "x-ms-client-request-id": "client-9"},
    )
    assert given.headers["x-request-id"] == "abc-123"
    assert given.headers["x-ms-request-id"] == "abc-123"
    assert given.headers["x-ms-client-request-id"] == "client-9"
    made = client.post("/score", json=texts("a"))
    uuid.UUID(made.headers["x-request-id"])
    assert made.headers["x-ms-request-id"] == made.headers["x-request-id"]
    assert "x-ms-client-request-id" not in made.headers
    assert client.post("/score", json={}).headers["x-request-id"]  # errors carry them too


def test_unknown_route_and_method_are_json(client: TestClient) -> None:
    missing = client.get("/nope")
    assert (missing.status_code, missing.json()) == (404, {"message": "Not Found"})
    wrong = client.get("/score")
    assert (wrong.status_code, wrong.json()) == (405, {"message": "Method Not Allowed"})


def test_unexpected_errors_are_a_json_500(
    app: FastAPI, model: EchoAdapter, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(*_: object) -> None:
        raise RuntimeError("not a blipserve error")

    monkeypatch.setattr(model, "batch_key", crash)
    client = TestClient(app, headers=AUTH, raise_server_exceptions=False)
    response = client.post("/score", json=texts("a"))
    assert response.status_code == 500
    assert response.json() == {"message": "internal error: RuntimeError"}


# -- metrics and the OpenAPI document --------------------------------------------------------


def test_metrics(client: TestClient) -> None:
    client.post("/score", json=texts("a", "b"))
    client.post("/score", json={})
    text = client.get("/metrics").text
    for name in (
        "blipserve_requests_total",
        "blipserve_queue_rows",
        "blipserve_batch_size",
        "blipserve_queue_wait_seconds",
        "blipserve_decode_seconds",
        "blipserve_model_seconds",
        "blipserve_images_total",
        "blipserve_request_seconds",
    ):
        assert name in text
    assert 'blipserve_requests_total{route="/score",status="200"} 1.0' in text
    assert 'blipserve_requests_total{route="/score",status="400"} 1.0' in text
    assert "blipserve_images_total 2.0" in text


def test_openapi_document(client: TestClient) -> None:
    doc = client.get("/swagger.json").json()
    score = doc["paths"]["/score"]["post"]
    body = score["requestBody"]["content"]["application/json"]
    assert set(body["examples"]) == {"caption", "image+text"}
    assert "input_data" in body["schema"]["properties"]
    assert "SplitInputSchema" in doc["components"]["schemas"]
    assert {"200", "400", "401", "413", "415", "503", "504"} <= set(score["responses"])
    assert "/v1/chat/completions" in doc["paths"]
    assert "/v1/models" in doc["paths"]
    assert not any("x-blipserve-schemas" in op for p in doc["paths"].values() for op in p.values())
    assert client.get("/docs").status_code == 200


# -- /v1/models (the chat route: test_routes_openai.py) --------------------------------------


def test_models_lists_the_one_model(client: TestClient) -> None:
    answer = client.get("/v1/models").json()
    assert answer["object"] == "list"
    assert [m["id"] for m in answer["data"]] == [MODEL]


# -- deadlines and disconnects, on the loop's clock -------------------------------------------


def async_client(app: FastAPI) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app)
    return httpx.AsyncClient(transport=transport, base_url="http://testserver", headers=AUTH)


def test_deadline_gives_504(make_app: ServerFactory, model: EchoAdapter) -> None:
    app = make_app(request_timeout_s=1.5)

    async def main() -> httpx.Response:
        async with async_client(app) as client:
            model.hold()
            request = asyncio.create_task(client.post("/score", json=texts("slow")))
            await asyncio.to_thread(model.started.wait, 5)  # the model holds the row
            VirtualTimeLoop.running().advance(1.5)
            return await request

    response = run_on_virtual_time(main())
    assert response.status_code == 504
    assert "did not finish within its deadline of 1.5 s" in response.json()["message"]


async def leaving_client(app: FastAPI, body: bytes, gone: asyncio.Event) -> list[Message]:
    """POST ``body`` to /score as a client that closes its connection once ``gone`` is set;
    what the app sent back (that nobody read)."""
    headers = {"content-type": "application/json", **AUTH, "content-length": str(len(body))}
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/score",
        "raw_path": b"/score",
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }
    pending: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[Message] = []

    async def receive() -> Message:
        if pending:
            return pending.pop()
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


class Watch:
    """Hooks on a loaded app's online engine: :meth:`queued` waits until a request's rows
    are queued, :meth:`finished` until a request's work has ended (answered, failed or,
    once its client has gone, wound down after being cancelled)."""

    def __init__(self, app: FastAPI, monkeypatch: pytest.MonkeyPatch) -> None:
        state = state_of(app)
        online = state.online
        assert online is not None
        self._queued: asyncio.Queue[None] = asyncio.Queue()
        self._finished: asyncio.Queue[None] = asyncio.Queue()
        record, predict = state.metrics.decoded, online.predict

        def decoded(seconds: float, bad_rows: int) -> None:
            # the engine calls this just before it queues the rows, with no await between
            record(seconds, bad_rows)
            self._queued.put_nowait(None)

        async def predict_and_tell(*args: Any, **kwargs: Any) -> Any:
            try:
                return await predict(*args, **kwargs)
            finally:
                self._finished.put_nowait(None)

        monkeypatch.setattr(state.metrics, "decoded", decoded)
        monkeypatch.setattr(online, "predict", predict_and_tell)

    async def queued(self) -> None:
        await self._queued.get()

    async def finished(self) -> None:
        await self._finished.get()


def test_a_disconnected_clients_rows_are_dropped(
    make_app: ServerFactory, model: EchoAdapter, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = make_app()
    watch = Watch(app, monkeypatch)

    async def main() -> list[Message]:
        async with async_client(app) as client:
            model.hold()
            busy = asyncio.create_task(client.post("/score", json=texts("busy")))
            await asyncio.to_thread(model.started.wait, 5)
            await watch.queued()
            gone = asyncio.Event()
            leaving = asyncio.create_task(
                leaving_client(app, json.dumps(texts("gone")).encode(), gone)
            )
            await watch.queued()  # "gone" waits behind "busy"
            gone.set()
            VirtualTimeLoop.running().advance(0.25)  # the route looks for a disconnect every 0.25 s
            sent = await leaving
            # The route answers at once and cancels the request's work, which drops its
            # queued rows as it winds down: a few turns of the loop later.
            await watch.finished()
            model.release()
            assert (await busy).status_code == 200
            after = await client.post("/score", json=texts("after"))
            assert after.json() == [{"text": "echo after"}]
            return sent

    sent = run_on_virtual_time(main())
    assert sent[0]["status"] == 499
    assert model.texts() == ["busy", "after"]
