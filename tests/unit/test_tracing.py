"""OpenTelemetry traces of requests, in process, with the SDK's in-memory exporter: a
server span per request (a child of the caller's ``traceparent``) and the engine's stages
as its children, at the times they ran."""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from starlette.testclient import TestClient

from blipserve.config import EngineConfig, FetchConfig, ModelConfig, ServerConfig, Settings
from blipserve.engine import Engine
from blipserve.server.app import create_app
from fakes import EchoAdapter
from helpers import jpeg_bytes, photos, score_body

pytest.importorskip("opentelemetry.sdk")
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


@pytest.fixture(scope="module")
def image_url() -> Iterator[str]:
    """A JPEG photograph served on loopback, as an image URL in a request."""
    body = jpeg_bytes(photos()["chelsea"])

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/cat.jpg"
    server.shutdown()
    server.server_close()


@pytest.fixture
def traced() -> Iterator[tuple[TestClient, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    settings = Settings(model=ModelConfig(model="echo"), server=ServerConfig(warmup=False))
    app = create_app(settings, tracer_provider=provider)
    fetch = FetchConfig(allow_url_hosts=("127.0.0.1",))
    model = EchoAdapter()
    app.state.blipserve.load(Engine(model, config=EngineConfig(max_batch_size=4), fetch=fetch))
    yield TestClient(app), exporter
    model.release()
    app.state.blipserve.shutdown()


def by_name(spans: tuple[ReadableSpan, ...]) -> dict[str, list[ReadableSpan]]:
    out: dict[str, list[ReadableSpan]] = {}
    for span in spans:
        out.setdefault(span.name, []).append(span)
    return out


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def times(span: ReadableSpan) -> tuple[int, int]:
    assert span.start_time is not None
    assert span.end_time is not None
    return span.start_time, span.end_time


def parent_id(span: ReadableSpan) -> int | None:
    return None if span.parent is None else span.parent.span_id


def test_a_request_span_follows_the_caller_and_holds_each_stage(
    traced: tuple[TestClient, InMemorySpanExporter], image_url: str
) -> None:
    client, exporter = traced
    photo = base64.encodebytes(jpeg_bytes(photos()["astronaut"])).decode()  # as clients do
    reply = client.post(
        "/score",
        json=score_body([[image_url], [photo]]),
        headers={"traceparent": f"00-{TRACE_ID}-{CALLER_SPAN}-01", "x-request-id": "req-1"},
    )
    assert reply.status_code == 200
    spans = by_name(exporter.get_finished_spans())
    [server] = spans["POST /score"]
    assert server.kind == SpanKind.SERVER
    assert f"{server.context.trace_id:032x}" == TRACE_ID
    assert f"{parent_id(server) or 0:016x}" == CALLER_SPAN
    assert attrs(server)["http.response.status_code"] == 200
    assert attrs(server)["blipserve.request_id"] == "req-1"
    [fetch] = spans["fetch"]
    decodes = {attrs(span)["blipserve.row"]: span for span in spans["decode"]}
    assert sorted(decodes) == [0, 1]
    assert len(spans["queue"]) == len(spans["model"]) >= 1
    start, end = times(server)
    for child in [fetch, *decodes.values(), *spans["queue"], *spans["model"]]:
        assert parent_id(child) == server.context.span_id
        assert start <= times(child)[0] <= times(child)[1] <= end
    assert times(decodes[0])[0] == times(fetch)[1]  # row 0: downloaded, then decoded
    model = spans["model"][-1]
    assert attrs(model)["blipserve.rows"] >= 1
    assert attrs(model)["blipserve.batch_rows"] >= attrs(model)["blipserve.rows"]
    assert times(model)[0] >= max(times(d)[1] for d in decodes.values())


def test_without_a_caller_a_request_starts_its_own_trace_and_errors_are_marked(
    traced: tuple[TestClient, InMemorySpanExporter],
) -> None:
    client, exporter = traced
    assert client.post("/score", json=score_body([["not base64!"]])).status_code == 400
    [server] = by_name(exporter.get_finished_spans())["POST /score"]
    assert server.parent is None
    assert attrs(server)["http.response.status_code"] == 400
    assert server.status.status_code == StatusCode.UNSET  # the client's error, not ours
    assert "model" not in by_name(exporter.get_finished_spans())  # refused before the queue
    exporter.clear()
    photo = base64.b64encode(jpeg_bytes(photos()["coffee"])).decode()
    body = score_body([[photo, "boom"]], ["image", "text"])  # the echo model fails on it
    assert client.post("/score", json=body).status_code == 500
    spans = by_name(exporter.get_finished_spans())
    [failed] = spans["POST /score"]
    assert failed.status.status_code == StatusCode.ERROR
    assert len(spans["model"]) == 1  # the call that failed is in the trace


def test_chat_requests_are_traced_too(
    traced: tuple[TestClient, InMemorySpanExporter],
) -> None:
    client, exporter = traced
    image = base64.b64encode(jpeg_bytes(photos()["coffee"])).decode()
    content = [{"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{image}"}}]
    body = {"model": "echo", "messages": [{"role": "user", "content": content}]}
    assert client.post("/v1/chat/completions", json=body).status_code == 200
    spans = by_name(exporter.get_finished_spans())
    assert {"POST /v1/chat/completions", "decode", "queue", "model"} <= set(spans)
