"""What the Azure ML catalog's inference server does around each request, here too, in
process: ``x-ms-run-fn-exec-ms`` on ``/score`` answers, request ids over 100 characters
answered with 431, ``TraceId`` echoed; and ``/docs`` served without a CDN.

The catalog server's behaviour is that of ``azureml-inference-server-http``'s routes
(``HEADER_LIMIT = 100``; ``TraceId`` added to every response; ``x-ms-run-fn-exec-ms`` the
time of the scoring function, three decimals).  The same headers over a real socket are
checked in tests/integration/test_server.py, the page in a browser in tests/browser.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from blipserve.config import ModelConfig, ServerConfig, Settings
from blipserve.server.app import create_app
from blipserve.server.http import REQUEST_ID_HEADERS
from helpers import b64_png


@pytest.fixture(scope="module")
def idle() -> TestClient:
    """The app without its model (the lifespan does not run): headers and pages only."""
    return TestClient(create_app(Settings()))


@pytest.fixture(scope="module")
def scoring(tiny_model_dir: dict[str, Path]) -> Iterator[TestClient]:
    """The app over the tiny BLIP captioner, loaded by its own lifespan."""
    settings = Settings(
        model=ModelConfig(model=str(tiny_model_dir["blip-caption"])),
        server=ServerConfig(warmup=False, max_wait_ms=0),
    )
    with TestClient(create_app(settings)) as client:
        give_up = time.monotonic() + 120
        while client.get("/ready").status_code != 200:
            assert time.monotonic() < give_up, client.get("/ready").text
            time.sleep(0.1)
        yield client


def score_body(text: str | None = None) -> dict[str, object]:
    row: list[object] = [b64_png(0)] if text is None else [b64_png(0), text]
    columns = ["image"] if text is None else ["image", "text"]
    return {"input_data": {"columns": columns, "data": [row]}, "params": {"max_new_tokens": 2}}


# -- x-ms-run-fn-exec-ms -------------------------------------------------------------------


def test_score_reports_the_scoring_time(scoring: TestClient) -> None:
    started = time.perf_counter()
    response = scoring.post("/score", json=score_body())
    wall_ms = (time.perf_counter() - started) * 1000
    assert response.status_code == 200, response.text
    exec_ms = response.headers["x-ms-run-fn-exec-ms"]
    assert re.fullmatch(r"\d+\.\d{3}", exec_ms), exec_ms  # 412.305, never 4.1e2
    assert 0 < float(exec_ms) <= wall_ms


def test_only_scored_answers_report_it(scoring: TestClient) -> None:
    # As in the catalog's server, where errors answer before the scoring function's timer.
    assert "x-ms-run-fn-exec-ms" not in scoring.post("/score", json={}).headers
    assert "x-ms-run-fn-exec-ms" not in scoring.get("/ready").headers


# -- request ids over 100 characters: 431 ------------------------------------------------


@pytest.mark.parametrize("header", REQUEST_ID_HEADERS)
def test_a_request_id_over_100_characters_is_431(idle: TestClient, header: str) -> None:
    response = idle.post("/score", json=score_body(), headers={header: "i" * 101})
    assert response.status_code == 431
    assert response.json() == {
        "message": f"request id headers may have at most 100 characters: {header} has 101"
    }
    # the refused id is not echoed; the answer still has an id to find it by in logs
    assert "i" * 101 not in response.headers.values()
    uuid.UUID(response.headers["x-request-id"])
    assert "x-ms-client-request-id" not in response.headers


def test_every_id_too_long_is_named(idle: TestClient) -> None:
    too_long = {"x-request-id": "a" * 150, "x-ms-client-request-id": "b" * 101}
    message = idle.get("/", headers=too_long).json()["message"]
    assert message.endswith(": x-request-id has 150, x-ms-client-request-id has 101")


def test_100_characters_are_fine_and_echoed(idle: TestClient) -> None:
    ids = {"x-request-id": "r" * 100, "x-ms-client-request-id": "c" * 100}
    response = idle.get("/", headers={**ids, "x-ms-request-id": "m" * 100})
    assert response.status_code == 200
    assert response.headers["x-request-id"] == ids["x-request-id"]
    assert response.headers["x-ms-client-request-id"] == ids["x-ms-client-request-id"]


def test_431_is_counted_in_the_metrics(idle: TestClient) -> None:
    idle.get("/ready", headers={"x-request-id": "z" * 101})
    metrics = idle.get("/metrics").text
    assert 'blipserve_requests_total{route="/ready",status="431"} 1.0' in metrics


# -- TraceId ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("GET", "/", 200), ("GET", "/nowhere", 404), ("POST", "/score", 415), ("GET", "/ready", 503)],
)
def test_trace_id_is_echoed(idle: TestClient, method: str, path: str, status: int) -> None:
    response = idle.request(method, path, headers={"TraceId": "office-trace-7"})
    assert response.status_code == status
    assert response.headers["TraceId"] == "office-trace-7"  # header names: any case
    assert "TraceId" not in idle.request(method, path).headers


def test_trace_id_is_echoed_on_a_431(idle: TestClient) -> None:
    response = idle.get("/", headers={"TraceId": "t-431", "x-request-id": "x" * 101})
    assert (response.status_code, response.headers["TraceId"]) == (431, "t-431")


# -- /docs without a CDN ----------------------------------------------------------------


class _Links(HTMLParser):
    """Every URL an HTML page makes the browser load: src= and href= attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [value for name, value in attrs if name in ("src", "href") and value]


def page_urls(html: str) -> list[str]:
    links = _Links()
    links.feed(html)
    # and the OpenAPI document the page's script asks for
    return [*links.urls, *re.findall(r"url: '([^']*)'", html)]


def test_docs_load_only_same_origin_assets(idle: TestClient) -> None:
    page = idle.get("/docs")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "://" not in page.text  # no absolute URL at all: nothing from elsewhere
    urls = page_urls(page.text)
    assert sorted(urls) == [
        "/docs/assets/favicon.png",
        "/docs/assets/swagger-ui-bundle.js",
        "/docs/assets/swagger-ui.css",
        "/swagger.json",
    ]
    types = {url: idle.get(url) for url in urls}
    assert all(response.status_code == 200 for response in types.values())
    assert (
        types["/docs/assets/swagger-ui-bundle.js"]
        .headers["content-type"]
        .startswith("text/javascript")
    )
    assert types["/docs/assets/swagger-ui.css"].headers["content-type"].startswith("text/css")
    assert types["/swagger.json"].json()["openapi"].startswith("3.1")
    # Swagger UI 5: the first major version that renders OpenAPI 3.1 documents
    bundle = types["/docs/assets/swagger-ui-bundle.js"].text
    assert re.search(r'PACKAGE_VERSION:"5\.\d+\.\d+"', bundle)


def test_docs_behind_a_path_prefix(idle: TestClient) -> None:
    proxied = TestClient(idle.app, root_path="/blip")
    urls = page_urls(proxied.get("/docs").text)
    assert len(urls) == 4
    assert all(url.startswith("/blip/") for url in urls), urls


def test_openapi_documents_the_headers(idle: TestClient) -> None:
    doc = idle.get("/swagger.json").json()
    score = doc["paths"]["/score"]["post"]["responses"]
    assert "x-ms-run-fn-exec-ms" in score["200"]["headers"]
    assert "431" in score
    assert "/docs" not in doc["paths"]
