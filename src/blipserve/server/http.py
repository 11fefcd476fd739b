"""HTTP plumbing the routes share: bodies, auth, disconnects, errors, request ids.

Typed errors (:mod:`blipserve.errors`) carry their status and headers; :func:`error_response`
is the one place they become responses.  The headers that go with every request (request
ids, ``TraceId``, ``x-ms-run-fn-exec-ms``) behave as in the Azure ML catalog's inference
server (``azureml-inference-server-http``), so that clients of a catalog deployment see
the same ones here.
"""

from __future__ import annotations

import asyncio
import hmac
import re
import time
import uuid
from collections.abc import Awaitable, Sequence
from typing import TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from blipserve.errors import (
    BlipserveError,
    ClientDisconnected,
    PayloadTooLarge,
    RequestHeaderTooLarge,
    Unauthorized,
    UnsupportedMediaType,
)
from blipserve.server.logs import REQUEST_ID, access_log
from blipserve.server.metrics import Metrics

T = TypeVar("T")

# Routes whose metrics are labelled by path; anything else is "other" (bounded cardinality).
# A route with a model's name in its path is labelled by its template, whatever the name.
KNOWN_ROUTES = (
    "/",
    "/ready",
    "/score",
    "/metrics",
    "/swagger.json",
    "/docs",
    "/v1/chat/completions",
    "/v1/models",
    "/v2",
    "/v2/health/live",
    "/v2/health/ready",
    "/v2/models/{name}",
    "/v2/models/{name}/ready",
    "/v2/models/{name}/infer",
    "/jobs",
    "/jobs/{name}",
    "/jobs/{name}/cancel",
)
# /v2/models/NAME[/versions/VERSION][/ready | /infer]; NAME may hold slashes (hub ids)
_V2_MODEL_ROUTE = re.compile(r"/v2/models/.+?(?:/versions/[^/]+)?(/ready|/infer)?")
_JOB_ROUTE = re.compile(r"/jobs/[^/]+(/cancel)?")

# The request ids the catalog's server reads, each answered with 431 past its limit.
REQUEST_ID_HEADERS = ("x-request-id", "x-ms-request-id", "x-ms-client-request-id")
MAX_REQUEST_ID_CHARS = 100
# Office services' own tracing header, which the catalog's server echoes on every response
# (ASGI header names are lower case; HTTP's are case-insensitive).
TRACE_ID_HEADER = "traceid"


def route_label(path: str) -> str:
    """The metrics label of a request for ``path``: one of :data:`KNOWN_ROUTES`, or "other"."""
    if path in KNOWN_ROUTES:
        return path
    if (model_route := _V2_MODEL_ROUTE.fullmatch(path)) is not None:
        return "/v2/models/{name}" + (model_route.group(1) or "")
    if (job_route := _JOB_ROUTE.fullmatch(path)) is not None:
        return "/jobs/{name}" + (job_route.group(1) or "")
    return "other"


def error_response(exc: BlipserveError, *, field: str = "message") -> JSONResponse:
    """The one place where typed errors become HTTP responses: ``{field: message}``
    (``message``; the Open Inference Protocol's routes say ``error``)."""
    return JSONResponse({field: exc.message}, status_code=exc.status, headers=exc.headers)


def error_field(path: str) -> str:
    """The key of an error's message in the body of a response for ``path``."""
    return "error" if path == "/v2" or path.startswith("/v2/") else "message"


async def read_json_body(request: Request, limit: int) -> bytes:
    """The body, refused with 415 unless JSON and with 413 past ``limit`` bytes."""
    content_type = request.headers.get("content-type", "")
    if "json" not in content_type.lower():
        raise UnsupportedMediaType(
            f"the body must be JSON (Content-Type: application/json), got "
            f"{content_type or 'no Content-Type'!r}"
        )
    return await read_body(request, limit)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, whatever its type, refused with 413 past ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the body is {declared} bytes; the limit is {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the body is larger than the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def run_fn_exec_ms(started: float) -> dict[str, str]:
    """``x-ms-run-fn-exec-ms``: milliseconds since ``started`` (``time.perf_counter``), with
    three decimals, as the catalog's server reports the time its scoring function took."""
    return {"x-ms-run-fn-exec-ms": f"{(time.perf_counter() - started) * 1000:.3f}"}


def request_ids_too_long(headers: dict[str, str]) -> RequestHeaderTooLarge | None:
    """The 431 for request id headers longer than :data:`MAX_REQUEST_ID_CHARS`, naming
    each; None when every one fits."""
    too_long = [
        f"{name} has {len(headers[name])}"
        for name in REQUEST_ID_HEADERS
        if len(headers.get(name, "")) > MAX_REQUEST_ID_CHARS
    ]
    if not too_long:
        return None
    return RequestHeaderTooLarge(
        f"request id headers may have at most {MAX_REQUEST_ID_CHARS} characters: "
        f"{', '.join(too_long)}"
    )


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``; if the client goes away first, cancel it (its queued rows drop)."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                raise ClientDisconnected()
    finally:
        if not task.done():
            task.cancel()


def check_auth(request: Request, keys: Sequence[str]) -> None:
    if not keys:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("missing API key: send 'Authorization: Bearer KEY'")
    token = token.strip()
    # compare against every key in constant time, without short-circuiting
    if not any([hmac.compare_digest(token.encode(), k.encode()) for k in keys]):
        raise Unauthorized("wrong API key")


class RequestContext:
    """Pure ASGI middleware: request ids in and out (431 when one is too long), ``TraceId``
    echoed, per-route metrics."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refused = request_ids_too_long(headers)
        # An id that is too long is neither used nor echoed (the 431 gets a fresh one).
        given = {k: v for k, v in headers.items() if len(v) <= MAX_REQUEST_ID_CHARS}
        request_id = given.get("x-request-id") or str(uuid.uuid4())
        client_id = given.get("x-ms-client-request-id")
        trace_id = headers.get(TRACE_ID_HEADER)
        scope.setdefault("state", {})["request_id"] = request_id
        token = REQUEST_ID.set(request_id)
        path = scope["path"]
        route = route_label(path)
        started = time.perf_counter()
        status = 500

        async def send_with_ids(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                extra = [(b"x-request-id", request_id), (b"x-ms-request-id", request_id)]
                if client_id:
                    extra.append((b"x-ms-client-request-id", client_id))
                if trace_id is not None:
                    extra.append((TRACE_ID_HEADER.encode(), trace_id))
                message["headers"] = [
                    *message.get("headers", []),
                    *((k, v.encode("latin-1")) for k, v in extra),
                ]
            await send(message)

        try:
            if refused is not None:
                answer = error_response(refused, field=error_field(path))
                await answer(scope, receive, send_with_ids)
            else:
                await self.app(scope, receive, send_with_ids)
        finally:
            seconds = time.perf_counter() - started
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.request_latency.labels(route).observe(seconds)
            access_log.info(
                "%s %s %d %.1f ms",
                scope.get("method", ""),
                path,
                status,
                seconds * 1000,
                extra={
                    "method": scope.get("method", ""),
                    "path": path,
                    "status": status,
                    "duration_ms": round(seconds * 1000, 3),
                    "client_request_id": client_id,
                },
            )
            REQUEST_ID.reset(token)
