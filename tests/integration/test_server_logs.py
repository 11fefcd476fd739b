"""`blipserve serve --log-format json`: every line of the real server's output is a JSON
object, and each request's lines carry the id the client sent (or the one the server made
up and answered with)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from helpers import b64_png, score_body
from testkit.live_server import RunningServer


@pytest.fixture(scope="module")
def server(server_factory: Callable[..., RunningServer], controllable_model: Path) -> RunningServer:
    return server_factory(controllable_model, "--log-format", "json", "--log-level", "info")


def lines(server: RunningServer) -> list[dict[str, Any]]:
    text = server.output()
    if not text.endswith("\n"):  # a line being written: read it next time
        text = text[: text.rfind("\n") + 1]
    out = []
    for line in text.splitlines():
        assert line.startswith("{"), f"not a JSON line: {line!r}"
        out.append(json.loads(line))
    return out


def access_lines(server: RunningServer, request_id: str, timeout: float = 10) -> list[Any]:
    """The access lines of ``request_id`` (written after the response is sent: poll)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [
            line
            for line in lines(server)
            if line["logger"] == "blipserve.access" and line.get("request_id") == request_id
        ]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def test_every_line_is_json_and_requests_carry_their_ids(server: RunningServer) -> None:
    url = f"{server.url}/score"
    good = httpx.post(
        url, json=score_body([[b64_png(1)]]), headers={"x-request-id": "job-42/row-7"}
    )
    assert good.status_code == 200
    assert good.headers["x-request-id"] == "job-42/row-7"
    [line] = access_lines(server, "job-42/row-7")
    assert (line["method"], line["path"], line["status"]) == ("POST", "/score", 200)
    assert line["level"] == "INFO"
    assert line["duration_ms"] > 0
    assert line["time"].endswith("+00:00")

    # The catalog's clients send x-ms-client-request-id: kept beside the server's own id.
    bad = httpx.post(
        url,
        json=score_body([["not base64!"]]),
        headers={"x-ms-client-request-id": "catalog-client-1"},
    )
    assert bad.status_code == 400
    [line] = access_lines(server, bad.headers["x-request-id"])
    assert line["status"] == 400
    assert line["client_request_id"] == "catalog-client-1"

    # A request the model fails on.
    boom = httpx.post(
        url,
        json=score_body([[b64_png(2), "boom"]], columns=["image", "text"]),
        headers={"x-request-id": "r-boom"},
    )
    assert boom.status_code == 500
    assert access_lines(server, "r-boom")[0]["status"] == 500
    # An image URL refused by the SSRF guard: logged on a decode thread, with the id.
    refused = httpx.post(
        url,
        json=score_body([["http://10.20.30.40/cat.jpg"]]),
        headers={"x-request-id": "ssrf-1"},
    )
    assert refused.status_code == 400
    access_lines(server, "ssrf-1")  # the request is done, its lines written
    [warning] = [line for line in lines(server) if "refused URL host" in line["message"]]
    assert warning["request_id"] == "ssrf-1"
    assert warning["level"] == "WARNING"

    startup = [line for line in lines(server) if line["logger"].startswith("uvicorn")]
    assert startup, "uvicorn's own lines go through the JSON formatter too"
