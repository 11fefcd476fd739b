"""The real server (``blipserve serve`` in a process, on a socket): answers, image URLs,
batching across connections, a client closing its connection, SIGTERM.

How the routes map errors, limits, auth, headers, deadlines, metrics and the OpenAPI
document to responses is tested in process, without a socket: tests/unit/test_routes.py.
"""

from __future__ import annotations

import base64
import signal
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from helpers import b64_png, score_body
from testkit.live_server import RunningServer

KEY = "test-key-1"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(server_factory: Callable[..., RunningServer], controllable_model: Path) -> RunningServer:
    return server_factory(
        controllable_model,
        "--api-key",
        KEY,
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


def test_concurrent_requests_are_merged_into_one_batch(
    server: RunningServer, client: httpx.Client
) -> None:
    bodies = [score_body([[b64_png(10 + i)]], max_new_tokens=4) for i in range(4)]
    alone = [client.post("/score", json=b).json() for b in bodies]
    batches_before = server.metric("blipserve_batch_size_count", AUTH)
    rows_before = server.metric("blipserve_batch_size_sum", AUTH)
    barrier = threading.Barrier(4)

    def send(body: dict[str, Any]) -> Any:
        barrier.wait()
        return client.post("/score", json=body).json()

    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(send, bodies))
    assert together == alone  # each client gets its own answer
    assert server.metric("blipserve_batch_size_sum", AUTH) - rows_before == 4
    assert server.metric("blipserve_batch_size_count", AUTH) - batches_before == 1


def test_disconnected_client_work_is_dropped(server: RunningServer, client: httpx.Client) -> None:
    """A client that closes its connection while its row waits: the row never runs."""
    decoded = server.metric("blipserve_decode_seconds_count", AUTH)
    images_before = server.metric("blipserve_images_total", AUTH)
    with ThreadPoolExecutor(1) as pool:
        busy = pool.submit(
            client.post, "/score", json=score_body([[b64_png(0), "sleep:2"]], ["image", "text"])
        )
        # once it is queued, the sleeper is the model's next batch
        server.wait_for_metric("blipserve_decode_seconds_count", decoded + 1, AUTH)
        with pytest.raises(httpx.ReadTimeout):  # queued behind the sleeper, it gives up
            httpx.post(
                f"{server.url}/score", json=score_body([[b64_png(5)]]), headers=AUTH, timeout=0.4
            )
        assert busy.result().status_code == 200
    # the model thread has passed the dropped row once a row queued after it is answered
    assert client.post("/score", json=score_body([[b64_png(6)]])).status_code == 200
    server.wait_for_metric("blipserve_images_total", images_before + 2, AUTH)
    # the sleeper and the last row, not the dropped one
    assert server.metric("blipserve_images_total", AUTH) - images_before == 2


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
        srv.wait_for_metric("blipserve_decode_seconds_count", 1)  # the row is queued
        srv.proc.send_signal(signal.SIGTERM)
        response = in_flight.result()
    assert response.status_code == 200
    assert response.json() == [{"text": "slept sleep:1.5"}]
    assert srv.proc.wait(20) == 0
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{srv.url}/", timeout=2)
