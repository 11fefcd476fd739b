"""OpenAPI-driven fuzzing (schemathesis) of the real server: no 5xx, and every response
(status, content type, body, headers) is one the document at /swagger.json describes.

Schemathesis reads the document the running server publishes, generates requests from it
(schema-valid ones, and in a second pass schema-invalid ones, which must get a 4xx) and
sends them over loopback. A request the fuzzer makes that the server answers in an
undocumented way is a bug in the server or in ``blipserve.openapi``, never in this test.

The default run is bounded (``EXAMPLES`` per operation and mode); the ``slow`` variant
runs ``BLIPSERVE_FUZZ_EXAMPLES`` (default 500) per operation and mode.
"""

from __future__ import annotations

import base64
import json
import os
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from helpers import b64_png
from testkit.live_server import RunningServer

KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
EXAMPLES = 25
SLOW_EXAMPLES = int(os.environ.get("BLIPSERVE_FUZZ_EXAMPLES", "500"))

# Every operation the server documents; test_every_operation_is_fuzzed keeps this honest.
OPERATIONS = [
    ("POST", "/score"),
    ("POST", "/v1/chat/completions"),
    ("GET", "/v1/models"),
    ("GET", "/metrics"),
    ("GET", "/ready"),
    ("GET", "/"),
    ("GET", "/v2/health/live"),
    ("GET", "/v2/health/ready"),
    ("GET", "/v2"),
    ("GET", "/v2/models/{model_name}"),
    ("GET", "/v2/models/{model_name}/ready"),
    ("POST", "/v2/models/{model_name}/infer"),
    ("POST", "/jobs"),
    ("GET", "/jobs"),
    ("GET", "/jobs/{name}"),
    ("POST", "/jobs/{name}/cancel"),
]
# POST routes without a body (nothing for negative cases to break)
BODILESS = {"/jobs/{name}/cancel"}
# Routes open without the key (the others answer 401 without it).
OPEN = {"/", "/ready", "/v2/health/live", "/v2/health/ready", "/v2/models/{model_name}/ready"}
# The served model's name in the documented examples (always served under this alias),
# and a job's
PATH_PARAMETERS = {"model_name": "blipserve", "name": "batchjob-none"}
# positive_data_acceptance is left out on purpose: a schema-valid body is not a valid
# request here (any string is a valid 'image' for the schema, few strings are images).
CHECKS = [
    not_a_server_error,  # first: the provoked-status test leaves it out
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]


@pytest.fixture(scope="module")
def jobs_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The batch endpoint's allowed root: an input folder of one image, a file that exists
    (an output no job may take), and the jobs folder."""
    root = tmp_path_factory.mktemp("jobs-root")
    (root / "in").mkdir()
    (root / "in" / "a.png").write_bytes(base64.b64decode(b64_png(0)))
    (root / "taken.csv").write_text("id,text\n")
    return root


@pytest.fixture(scope="module")
def server(
    server_factory: Callable[..., RunningServer], controllable_model: Path, jobs_root: Path
) -> RunningServer:
    # --no-allow-urls: the documented examples contain https://example.com/...; nothing here
    # may leave loopback. Small limits make the 413 path reachable for generated bodies.
    return server_factory(
        controllable_model,
        "--api-key",
        KEY,
        "--no-allow-urls",
        "--max-body-bytes",
        "200000",
        "--max-rows",
        "8",
        "--max-wait-ms",
        "0",
        "--max-queue",
        "4",
        *("--jobs-dir", str(jobs_root / "jobs"), "--jobs-allow-root", str(jobs_root)),
    )


@pytest.fixture(scope="module")
def api(server: RunningServer) -> Any:
    return schemathesis.openapi.from_url(f"{server.url}/swagger.json", timeout=10)


def fuzz(api: Any, server: RunningServer, method: str, path: str, examples: int) -> Counter[int]:
    """Run up to ``examples`` positive (and negative) cases; how often each status came."""
    operation = api[path][method]
    statuses: Counter[int] = Counter()
    fuzz_mode(operation, GenerationMode.POSITIVE, CHECKS, server, examples, statuses)
    if method == "POST" and path not in BODILESS:  # negative cases need a body to break
        checks = [*CHECKS, negative_data_rejection]
        fuzz_mode(operation, GenerationMode.NEGATIVE, checks, server, examples, statuses)
    print(f"{method} {path}: {sum(statuses.values())} calls, statuses {dict(statuses)}")
    return statuses


def fuzz_mode(
    operation: Any,
    mode: GenerationMode,
    checks: list[Any],
    server: RunningServer,
    examples: int,
    statuses: Counter[int],
) -> None:
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,  # the same cases every run: a failure is reproducible
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        response = case.call_and_validate(
            base_url=server.url, headers=AUTH, checks=checks, timeout=30
        )
        statuses[response.status_code] += 1

    run()


def test_every_operation_is_fuzzed(api: Any) -> None:
    documented = set()
    for result in api.get_all_operations():
        operation = result.ok()
        documented.add((operation.method.upper(), operation.path))
    assert documented == set(OPERATIONS)


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_fuzz_operation(api: Any, server: RunningServer, method: str, path: str) -> None:
    assert fuzz(api, server, method, path, EXAMPLES)
    assert server.proc.poll() is None


@pytest.mark.slow
@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_fuzz_operation_long(api: Any, server: RunningServer, method: str, path: str) -> None:
    assert fuzz(api, server, method, path, SLOW_EXAMPLES)
    assert server.proc.poll() is None


def test_documented_examples_without_a_key(api: Any, server: RunningServer) -> None:
    """Each operation's documented example, sent without the key, is answered as documented."""
    for method, path in OPERATIONS:
        wanted = {k: v for k, v in PATH_PARAMETERS.items() if "{" + k + "}" in path}
        case = api[path][method].Case(path_parameters=wanted or None)
        response = case.call(base_url=server.url, timeout=30)
        expected = 200 if path in OPEN else 401
        assert response.status_code == expected, (method, path, response.text)
        case.validate_response(response, checks=CHECKS)


def png_row(seed: int, text: str | None = None) -> list[str]:
    return [b64_png(seed)] if text is None else [b64_png(seed), text]


def score(*rows: list[str], **params: Any) -> dict[str, Any]:
    columns = ["image", "text"] if any(len(r) == 2 for r in rows) else ["image"]
    body: dict[str, Any] = {"input_data": {"columns": columns, "data": list(rows)}}
    if params:
        body["params"] = params
    return body


def chat(text: str, image: str | None = None) -> dict[str, Any]:
    url = f"data:image/png;base64,{image or b64_png(0)}"
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]
    return {"model": "m", "max_tokens": 3, "messages": [{"role": "user", "content": content}]}


def infer(*images: str, texts: list[str] | None = None) -> dict[str, Any]:
    """A v2 inference request: one row per image (and text)."""
    inputs = [{"name": "image", "datatype": "BYTES", "shape": [len(images)], "data": list(images)}]
    if texts is not None:
        inputs.append({"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts})
    return {"inputs": inputs, "parameters": {"max_new_tokens": 3}}


def job(source: str, output: str | None = None, kind: str = "UriFolder") -> dict[str, Any]:
    """A catalog invoke body; ``{root}`` in a URI is the fuzzed server's allowed root."""
    props: dict[str, Any] = {"InputData": {"in": {"JobInputType": kind, "Uri": source}}}
    if output is not None:
        props["OutputData"] = {"out": {"JobOutputType": "UriFile", "Uri": output}}
    return {"properties": props}


INFER = "/v2/models/blipserve/infer"
JSON = {"Content-Type": "application/json"}
# Every status the routes document, provoked on purpose: (route, request, status).
PROVOKED: list[tuple[str, dict[str, Any], int]] = [
    ("/score", {"json": score(png_row(0), max_new_tokens=3)}, 200),
    ("/score", {"json": score(png_row(0), ["@@@"])}, 400),
    ("/score", {"json": score(png_row(0)), "headers": {"Authorization": "Bearer nope"}}, 401),
    ("/score", {"json": score(["A" * 250_000])}, 413),
    ("/score", {"content": b"{}", "headers": {"Content-Type": "text/plain"}}, 415),
    ("/score", {"json": score(png_row(0, "boom"))}, 500),
    ("/score", {"json": score(*(png_row(i) for i in range(5)))}, 400),  # > --max-queue 4
    ("/score", {"json": score(png_row(0)), "headers": {"x-request-id": "i" * 101}}, 431),
    ("/v1/chat/completions", {"json": chat("describe")}, 200),
    ("/v1/chat/completions", {"json": chat("describe", image="@@@")}, 400),
    ("/v1/chat/completions", {"json": chat("x"), "headers": {"Authorization": "Basic x"}}, 401),
    ("/v1/chat/completions", {"content": b"{" + b" " * 210_000 + b"}", "headers": JSON}, 413),
    ("/v1/chat/completions", {"content": b"{}", "headers": {"Content-Type": "text/xml"}}, 415),
    ("/v1/chat/completions", {"json": chat("x"), "headers": {"x-ms-request-id": "m" * 101}}, 431),
    (INFER, {"json": infer(png_row(0)[0])}, 200),
    (INFER, {"json": infer(png_row(0)[0], "@@@")}, 400),
    (INFER, {"json": infer("x"), "headers": {"Authorization": "Bearer nope"}}, 401),
    ("/v2/models/nobody/infer", {"json": infer(png_row(0)[0])}, 404),
    (INFER, {"json": infer("A" * 250_000)}, 413),
    (INFER, {"content": b"{}", "headers": {"Content-Type": "text/plain"}}, 415),
    (INFER, {"json": infer("x"), "headers": {"x-request-id": "i" * 101}}, 431),
    (INFER, {"json": infer(png_row(0)[0], texts=["boom"])}, 500),
    (INFER, {"json": infer(*(png_row(i)[0] for i in range(5)))}, 400),  # > --max-queue 4
    ("/jobs", {"json": job("{root}/in")}, 202),
    ("/jobs", {"json": job("{root}/in", kind="Literal")}, 400),
    ("/jobs", {"json": job("{root}/in"), "headers": {"Authorization": "Bearer nope"}}, 401),
    ("/jobs", {"json": job("/etc")}, 403),
    ("/jobs", {"json": job("{root}/in", "{root}/taken.csv")}, 409),
    ("/jobs", {"json": job("{root}/in" + "/x" * 40_000)}, 413),
    ("/jobs", {"content": b"{}", "headers": {"Content-Type": "text/plain"}}, 415),
    ("/jobs/batchjob-none/cancel", {}, 404),
]


@pytest.mark.parametrize(
    ("path", "request_kwargs", "status"),
    PROVOKED,
    ids=[f"{path}-{status}" for path, _, status in PROVOKED],
)
def test_every_documented_status_matches_the_document(
    api: Any,
    server: RunningServer,
    jobs_root: Path,
    path: str,
    request_kwargs: dict[str, Any],
    status: int,
) -> None:
    provoke(api, server, path, dict(request_kwargs), status, jobs_root)


def test_deadline_504_matches_the_document(
    api: Any, server_factory: Callable[..., RunningServer], controllable_model: Path
) -> None:
    # Its own server: a deadline short enough to pass on purpose would also pass by accident
    # under fuzzing on a busy machine.
    hurried = server_factory(
        controllable_model, "--api-key", KEY, "--request-timeout-s", "1", "--max-wait-ms", "0"
    )
    provoke(api, hurried, "/score", {"json": score(png_row(0, "sleep:3"))}, 504)
    provoke(api, hurried, INFER, {"json": infer(png_row(0)[0], texts=["sleep:3"])}, 504)


def test_a_full_queue_503_matches_the_document(
    api: Any, server_factory: Callable[..., RunningServer], controllable_model: Path
) -> None:
    """The model runs a sleeping row, two rows wait (the queue holds two): one more row
    is refused with 503 on both routes."""
    full = server_factory(
        controllable_model, "--api-key", KEY, "--max-wait-ms", "0", "--max-queue", "2"
    )
    url = f"{full.url}/score"
    with ThreadPoolExecutor(2) as pool:
        decoded = full.metric("blipserve_decode_seconds_count", AUTH)
        sleeper = pool.submit(
            httpx.post, url, headers=AUTH, json=score(png_row(0, "sleep:4")), timeout=30
        )
        full.wait_for_metric("blipserve_decode_seconds_count", decoded + 1, AUTH)
        queued_rows(full, 0)  # the model thread has taken the sleeper: the queue is empty
        waiting = pool.submit(
            httpx.post, url, headers=AUTH, json=score(png_row(1), png_row(2)), timeout=30
        )
        queued_rows(full, 2)
        provoke(api, full, "/score", {"json": score(png_row(3))}, 503)
        provoke(api, full, INFER, {"json": infer(png_row(3)[0])}, 503)
        assert sleeper.result().status_code == 200
        assert waiting.result().status_code == 200


def queued_rows(server: RunningServer, rows: int, timeout: float = 20) -> None:
    """Poll until ``rows`` rows wait in the server's queue."""
    deadline = time.monotonic() + timeout
    while server.metric("blipserve_queue_rows", AUTH) != rows:
        assert time.monotonic() < deadline, f"the queue never held {rows} rows"
        time.sleep(0.02)


def provoke(
    api: Any,
    server: RunningServer,
    path: str,
    request_kwargs: dict[str, Any],
    status: int,
    root: Path | None = None,
) -> None:
    headers = {**AUTH, **request_kwargs.pop("headers", {})}
    if "json" in request_kwargs and root is not None:  # (a job's URIs under the root)
        text = json.dumps(request_kwargs["json"]).replace("{root}", str(root))
        request_kwargs["json"] = json.loads(text)
    response = httpx.post(server.url + path, headers=headers, timeout=30, **request_kwargs)
    assert response.status_code == status, response.text
    template, parameters = path, None
    if path.startswith("/v2/models/"):
        template = "/v2/models/{model_name}/infer"
        parameters = {"model_name": path.removeprefix("/v2/models/").removesuffix("/infer")}
    elif path.startswith("/jobs/"):
        template = "/jobs/{name}/cancel"
        parameters = {"name": path.split("/")[2]}
    case = api[template]["POST"].Case(
        body=request_kwargs.get("json"),
        media_type="application/json",
        path_parameters=parameters,
    )
    # 500/503/504 are provoked on purpose here: only conformance to the document counts.
    case.validate_response(response, checks=CHECKS[1:])
    if status >= 400:
        assert response.json()["error" if path.startswith("/v2/") else "message"]
