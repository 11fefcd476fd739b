"""The real server over HTTP: contract, errors, auth, headers, batching, limits, shutdown."""

from __future__ import annotations

import base64
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from helpers import b64_png
from live_server import RunningServer

KEY = "test-key-1"
AUTH = {"Authorization": f"Bearer {KEY}"}


def score_body(
    rows: list[list[Any]], columns: list[str] | None = None, **params: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "input_data": {
            "columns": columns or ["image"],
            "index": list(range(len(rows))),
            "data": rows,
        }
    }
    if params:
        body["params"] = params
    return body


def metric(server: RunningServer, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics", headers=AUTH, timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture(scope="module")
def server(server_factory: Callable[..., RunningServer], controllable_model: Path) -> RunningServer:
    return server_factory(
        controllable_model,
        "--api-key",
        KEY,
        "--api-key",
        "second-key",
        "--max-body-bytes",
        "300000",
        "--max-wait-ms",
        "500",
        "--max-batch-size",
        "8",
        "--allow-url-host",
        "127.0.0.1",
    )


@pytest.fixture(scope="module")
def client(server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as c:
        yield c


def test_health_routes_are_open(server: RunningServer) -> None:
    live = httpx.get(f"{server.url}/")
    assert live.status_code == 200
    assert live.text == "Healthy"
    ready = httpx.get(f"{server.url}/ready")
    assert ready.status_code == 200
    assert ready.json()["kind"] == "controllable-blip"


def test_score_image_column(client: httpx.Client) -> None:
    body = score_body([[b64_png(0)], [b64_png(1, lines=True)]], max_new_tokens=5)
    first = client.post("/score", json=body)
    assert first.status_code == 200, first.text
    answer = first.json()
    assert [set(a) for a in answer] == [{"text"}, {"text"}]
    assert all(a["text"] for a in answer)
    assert client.post("/score", json=body).json() == answer  # deterministic


def test_score_image_and_text_columns(client: httpx.Client) -> None:
    body = score_body(
        [[b64_png(0), "a picture of"], [b64_png(2), None]], ["image", "text"], max_new_tokens=4
    )
    answer = client.post("/score", json=body).json()
    assert answer[0]["text"].startswith("a picture of")
    assert not answer[1]["text"].startswith("a picture of")


def test_params_take_effect(client: httpx.Client) -> None:
    lengths = []
    for n in (2, 9):
        body = score_body([[b64_png(3)]], max_new_tokens=n, min_new_tokens=n)
        lengths.append(len(client.post("/score", json=body).json()[0]["text"].split()))
    assert lengths[0] < lengths[1]


@pytest.mark.parametrize(
    ("kwargs", "status", "message"),
    [
        ({"json": score_body([[b64_png(0)], ["@@@"]])}, 400, "row 1: image is not valid base64"),
        ({"json": {"input": []}}, 400, "no 'input_data' key"),
        ({"json": score_body([[b64_png(0)]], beams=2)}, 400, "unknown parameter(s) 'beams'"),
        ({"content": b"{", "headers": {"Content-Type": "application/json"}}, 400, "not valid JSON"),
        ({"content": b"hello", "headers": {"Content-Type": "text/plain"}}, 415, "must be JSON"),
        ({"json": score_body([["A" * 400_000]])}, 413, "limit is 300000 bytes"),
    ],
)
def test_score_errors(
    client: httpx.Client, kwargs: dict[str, Any], status: int, message: str
) -> None:
    response = client.post("/score", **kwargs)
    assert response.status_code == status
    assert message in response.json()["message"]


def test_chunked_body_over_the_limit_is_413(client: httpx.Client) -> None:
    def chunks() -> Any:
        for _ in range(40):
            yield b"x" * 10_000

    response = client.post("/score", content=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413


@pytest.mark.parametrize("path", ["/score", "/v1/models", "/metrics"])
def test_auth_required(server: RunningServer, path: str) -> None:
    method = "POST" if path == "/score" else "GET"
    missing = httpx.request(method, server.url + path, json=score_body([[b64_png(0)]]))
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == "Bearer"
    assert "missing API key" in missing.json()["message"]
    wrong = httpx.request(
        method,
        server.url + path,
        json=score_body([[b64_png(0)]]),
        headers={"Authorization": "Bearer nope"},
    )
    assert wrong.status_code == 401
    second = httpx.request(
        method,
        server.url + path,
        json=score_body([[b64_png(0)]]),
        headers={"Authorization": "Bearer second-key"},
    )
    assert second.status_code == 200


def test_request_id_headers(client: httpx.Client) -> None:
    body = score_body([[b64_png(0)]], max_new_tokens=2)
    given = client.post(
        "/score",
        json=body,
        headers={"x-request-id": "abc-123", "x-ms-client-request-id": "client-9"},
    )
    assert given.headers["x-request-id"] == "abc-123"
    assert given.headers["x-ms-request-id"] == "abc-123"
    assert given.headers["x-ms-client-request-id"] == "client-9"
    made = client.post("/score", json=body)
    uuid.UUID(made.headers["x-request-id"])
    assert made.headers["x-ms-request-id"] == made.headers["x-request-id"]
    # errors carry them too
    assert client.post("/score", json={}).headers["x-request-id"]


@pytest.fixture(scope="module")
def image_host() -> Iterator[str]:
    """A loopback HTTP server with one PNG, standing in for an image CDN."""
    png = base64.b64decode(b64_png(7))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(png)))
            self.end_headers()
            self.wfile.write(png)

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_url_images_from_an_allowed_host(client: httpx.Client, image_host: str) -> None:
    by_url = client.post(
        "/score", json=score_body([[f"http://{image_host}/a.png"]], max_new_tokens=4)
    )
    assert by_url.status_code == 200, by_url.text
    inline = client.post("/score", json=score_body([[b64_png(7)]], max_new_tokens=4))
    assert by_url.json() == inline.json()


@pytest.mark.parametrize("host", ["localhost", "127.1", "[::1]", "169.254.169.254"])
def test_url_to_internal_address_is_refused(
    client: httpx.Client, image_host: str, host: str
) -> None:
    port = image_host.rsplit(":", 1)[1]
    response = client.post("/score", json=score_body([[f"http://{host}:{port}/a.png"]]))
    assert response.status_code == 400
    assert response.json()["message"].startswith("row 0: URL refused")


def test_unknown_route_is_json(client: httpx.Client) -> None:
    response = client.get("/nope")
    assert response.status_code == 404
    assert response.json() == {"message": "Not Found"}


def test_concurrent_requests_are_merged_into_one_batch(
    server: RunningServer, client: httpx.Client
) -> None:
    bodies = [score_body([[b64_png(10 + i)]], max_new_tokens=4) for i in range(4)]
    alone = [client.post("/score", json=b).json() for b in bodies]
    batches_before = metric(server, "blipserve_batch_size_count")
    rows_before = metric(server, "blipserve_batch_size_sum")
    barrier = threading.Barrier(4)

    def send(body: dict[str, Any]) -> Any:
        barrier.wait()
        return client.post("/score", json=body).json()

    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(send, bodies))
    assert together == alone  # each client gets its own answer
    assert metric(server, "blipserve_batch_size_sum") - rows_before == 4
    assert metric(server, "blipserve_batch_size_count") - batches_before == 1


def test_model_fault_fails_only_that_request(client: httpx.Client) -> None:
    broken = client.post("/score", json=score_body([[b64_png(0), "boom"]], ["image", "text"]))
    assert broken.status_code == 500
    assert "injected fault" in broken.json()["message"]
    assert client.post("/score", json=score_body([[b64_png(0)]])).status_code == 200


def test_disconnected_client_work_is_dropped(server: RunningServer, client: httpx.Client) -> None:
    images_before = metric(server, "blipserve_images_total")
    with ThreadPoolExecutor(1) as pool:
        busy = pool.submit(
            client.post, "/score", json=score_body([[b64_png(0), "sleep:2"]], ["image", "text"])
        )
        time.sleep(0.8)  # the model is now asleep on the busy row
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                f"{server.url}/score", json=score_body([[b64_png(5)]]), headers=AUTH, timeout=0.4
            )
        assert busy.result().status_code == 200
    time.sleep(1.0)
    assert metric(server, "blipserve_images_total") - images_before == 1


def test_metrics(client: httpx.Client) -> None:
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
    assert 'blipserve_requests_total{route="/score",status="200"}' in text
    assert 'blipserve_requests_total{route="/score",status="400"}' in text


def test_openapi_document(server: RunningServer) -> None:
    doc = httpx.get(f"{server.url}/swagger.json").json()
    score = doc["paths"]["/score"]["post"]
    body = score["requestBody"]["content"]["application/json"]
    assert set(body["examples"]) == {"caption", "image+text"}
    assert "input_data" in body["schema"]["properties"]
    assert "SplitInputSchema" in doc["components"]["schemas"]
    assert {"200", "400", "401", "413", "415", "503", "504"} <= set(score["responses"])
    assert "/v1/chat/completions" in doc["paths"]
    assert httpx.get(f"{server.url}/docs").status_code == 200


# -- limits: a server with a tiny queue and a short deadline ---------------------------


@pytest.fixture(scope="module")
def limited(
    server_factory: Callable[..., RunningServer], controllable_model: Path
) -> RunningServer:
    return server_factory(
        controllable_model,
        "--max-queue",
        "2",
        "--max-batch-size",
        "1",
        "--request-timeout-s",
        "1.5",
        "--max-wait-ms",
        "0",
    )


def test_deadline_gives_504(limited: RunningServer) -> None:
    started = time.monotonic()
    response = httpx.post(
        f"{limited.url}/score",
        timeout=30,
        json=score_body([[b64_png(0), "sleep:4"]], ["image", "text"]),
    )
    assert response.status_code == 504
    assert "deadline" in response.json()["message"]
    assert time.monotonic() - started < 3.5
    time.sleep(3)  # let the model finish the abandoned sleep before the next test


def test_full_queue_gives_503_with_retry_after(limited: RunningServer) -> None:
    sleepy = score_body([[b64_png(0), "sleep:1.2"]], ["image", "text"])
    two = score_body([[b64_png(0), "sleep:0.1"], [b64_png(1), "sleep:0.1"]], ["image", "text"])
    with ThreadPoolExecutor(2) as pool:
        busy = pool.submit(httpx.post, f"{limited.url}/score", json=sleepy, timeout=30)
        time.sleep(0.4)  # the model holds the sleepy row; the queue is empty
        queued = pool.submit(httpx.post, f"{limited.url}/score", json=two, timeout=30)
        time.sleep(0.3)  # two rows now fill the queue
        refused = httpx.post(f"{limited.url}/score", json=score_body([[b64_png(2)]]), timeout=30)
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
        assert "queue is full" in refused.json()["message"]
        assert busy.result().status_code == 200
        queued.result()
    assert httpx.get(f"{limited.url}/ready").status_code == 200


# -- shutdown ----------------------------------------------------------------------------


def test_sigterm_finishes_in_flight_request(
    server_factory: Callable[..., RunningServer], controllable_model: Path
) -> None:
    srv = server_factory(controllable_model)
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(
            httpx.post,
            f"{srv.url}/score",
            timeout=30,
            json=score_body([[b64_png(0), "sleep:1.5"]], ["image", "text"]),
        )
        time.sleep(0.5)
        srv.proc.send_signal(signal.SIGTERM)
        response = in_flight.result()
    assert response.status_code == 200
    assert response.json() == [{"text": "slept sleep:1.5"}]
    assert srv.proc.wait(20) == 0
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{srv.url}/", timeout=2)
