"""HTTP routes over the engine: the catalog's ``/score``, health, metrics, OpenAI chat.

Routes only parse, call the shared pipeline (:class:`Pipeline`) and encode; typed errors
become status codes in one handler (:func:`error_response`).
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import signal
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from blipserve import openai_contract, ui
from blipserve.batcher import Batcher
from blipserve.config import EngineConfig, FetchConfig, ImageLimits, ModelConfig, ServerConfig
from blipserve.contract import Prediction, RowInput, encode_response, parse_request
from blipserve.engine import Engine, PreparedRow, raise_row_errors
from blipserve.errors import (
    BlipserveError,
    DeadlineExceeded,
    InvalidInput,
    ModelNotReady,
    Overloaded,
    PayloadTooLarge,
    RowError,
    Unauthorized,
    UnsupportedMediaType,
)
from blipserve.metrics import Metrics
from blipserve.openapi import (
    CHAT_OPENAPI,
    ERROR_RESPONSES,
    SCORE_OPENAPI,
    ScoreAnswer,
    json_errors,
)
from blipserve.params import GenerationParams

log = logging.getLogger(__name__)

T = TypeVar("T")

# Routes whose metrics are labelled by path; anything else is "other" (bounded cardinality).
KNOWN_ROUTES = (
    "/",
    "/ready",
    "/score",
    "/metrics",
    "/swagger.json",
    "/docs",
    "/v1/chat/completions",
    "/v1/models",
)
CLIENT_GONE = 499  # nginx's convention for "client closed the request"


@dataclass
class ServerState:
    """What the routes share; filled in by the loader thread."""

    model: ModelConfig
    engine_config: EngineConfig
    limits: ImageLimits
    fetch: FetchConfig
    server: ServerConfig
    metrics: Metrics = field(default_factory=Metrics)
    engine: Engine | None = None
    batcher: Batcher | None = None
    ready: bool = False
    load_error: str | None = None
    on_load_failure: Callable[[], None] | None = None

    def load(self, engine: Engine | None = None) -> None:
        """Load the model (unless given), start the batcher, warm up, then report ready."""
        try:
            if engine is None:
                engine = Engine.load(
                    self.model, config=self.engine_config, limits=self.limits, fetch=self.fetch
                )
            self.engine = engine
            if self.server.warmup:
                engine.warm_up()
            self.batcher = Batcher(
                engine.run_batch,
                max_batch_size=engine.max_batch_size,
                max_wait_s=self.server.max_wait_ms / 1000,
                max_queue=self.server.max_queue,
                observer=self.metrics,
            )
            self.batcher.start()
            self.ready = True
            log.info("ready: %s (%s)", self.model.model, engine.adapter.kind)
        except BlipserveError as exc:
            self.load_error = exc.message
            log.error("could not start: %s", exc.message)
            if self.on_load_failure:
                self.on_load_failure()
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.exception("could not start")
            if self.on_load_failure:
                self.on_load_failure()

    def shutdown(self) -> None:
        if self.batcher:
            self.batcher.stop(timeout=self.server.graceful_timeout_s)
        if self.engine:
            self.engine.close()


class Pipeline:
    """decode (thread pool) -> dynamic batcher -> predictions, under one deadline."""

    def __init__(self, state: ServerState) -> None:
        self.state = state

    def ready_parts(self) -> tuple[Engine, Batcher]:
        s = self.state
        if not s.ready or s.engine is None or s.batcher is None:
            why = s.load_error or "the model is still loading"
            raise ModelNotReady(f"not ready: {why}")
        return s.engine, s.batcher

    async def predict(
        self, rows: Sequence[RowInput], params: GenerationParams, deadline: float
    ) -> list[Prediction]:
        engine, batcher = self.ready_parts()
        # Rows that cannot be queued are refused before their images are fetched and decoded
        # (each decoded image can hold up to max_image_pixels x 3 bytes).
        batcher.refuse_if_full(len(rows))
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            async with asyncio.timeout_at(deadline):
                jobs = [
                    loop.run_in_executor(
                        engine.decode_pool, functools.partial(engine.prepare, row, params)
                    )
                    for row in rows
                ]
                outcomes = await asyncio.gather(*jobs, return_exceptions=True)
        except TimeoutError:
            raise DeadlineExceeded(
                "the request's deadline passed while its images were being fetched"
            ) from None
        self.state.metrics.decode_time.observe(time.perf_counter() - started)
        prepared: list[PreparedRow | RowError] = []
        for outcome in outcomes:
            if isinstance(outcome, (PreparedRow, RowError)):
                prepared.append(outcome)
            elif isinstance(outcome, BaseException):
                raise outcome
        bad = sum(isinstance(p, RowError) for p in prepared)
        if bad:
            self.state.metrics.image_errors.inc(bad)
        good = raise_row_errors(prepared)
        results = await batcher.run(
            [(p.item, p.key) for p in good], timeout=max(0.0, deadline - loop.time())
        )
        predictions = []
        for result in results:
            if not isinstance(result, Prediction):
                raise result
            predictions.append(result)
        return predictions


# -- plumbing shared by the routes ---------------------------------------------------------


async def read_json_body(request: Request, limit: int) -> bytes:
    """The body, refused with 415 unless JSON and with 413 past ``limit`` bytes."""
    content_type = request.headers.get("content-type", "")
    if "json" not in content_type.lower():
        raise UnsupportedMediaType(
            f"the body must be JSON (Content-Type: application/json), got "
            f"{content_type or 'no Content-Type'!r}"
        )
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


class ClientDisconnected(BlipserveError):
    status = CLIENT_GONE

    def __init__(self) -> None:
        super().__init__("the client disconnected")


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


def error_response(exc: BlipserveError) -> JSONResponse:
    """The one place where typed errors become HTTP responses."""
    headers = {}
    if isinstance(exc, Overloaded):
        headers["Retry-After"] = str(exc.retry_after_s)
    elif isinstance(exc, ModelNotReady):
        headers["Retry-After"] = "5"
    elif isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse({"message": exc.message}, status_code=exc.status, headers=headers)


class RequestContext:
    """Pure ASGI middleware: request ids in and out, per-route metrics."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        request_id = headers.get("x-request-id") or str(uuid.uuid4())
        client_id = headers.get("x-ms-client-request-id")
        scope.setdefault("state", {})["request_id"] = request_id
        path = scope["path"]
        route = path if path in KNOWN_ROUTES else "other"
        started = time.perf_counter()
        status = 500

        async def send_with_ids(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                extra = [(b"x-request-id", request_id), (b"x-ms-request-id", request_id)]
                if client_id:
                    extra.append((b"x-ms-client-request-id", client_id))
                message["headers"] = [
                    *message.get("headers", []),
                    *((k, v.encode("latin-1")) for k, v in extra),
                ]
            await send(message)

        try:
            await self.app(scope, receive, send_with_ids)
        finally:
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.request_latency.labels(route).observe(time.perf_counter() - started)


# -- the app -------------------------------------------------------------------------------


def create_app(
    model: ModelConfig | None = None,
    *,
    engine_config: EngineConfig | None = None,
    limits: ImageLimits | None = None,
    fetch: FetchConfig | None = None,
    server: ServerConfig | None = None,
    engine: Engine | None = None,
) -> FastAPI:
    """The ASGI app. The model loads in a background thread after startup (``/ready``
    answers 503 until it is loaded and warmed up); pass ``engine`` to serve one you have.
    """
    state = ServerState(
        model=model or ModelConfig(),
        engine_config=engine_config or EngineConfig(),
        limits=limits or ImageLimits(),
        fetch=fetch or FetchConfig(),
        server=server or ServerConfig(),
    )
    pipeline = Pipeline(state)
    cfg = state.server

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = threading.Thread(
            target=state.load, args=(engine,), name="blipserve-load", daemon=True
        )
        loader.start()
        yield
        await asyncio.to_thread(state.shutdown)

    app = FastAPI(
        title="blipserve",
        summary="BLIP and BLIP-2 image-to-text models behind the Azure ML catalog's contract.",
        description="Try the model in a browser: [/ui/](/ui/).",
        version=__import__("blipserve").__version__,
        openapi_url="/swagger.json",
        docs_url="/docs",
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.blipserve = state
    app.add_middleware(RequestContext, metrics=state.metrics)
    _document_hand_parsed_bodies(app)

    @app.exception_handler(BlipserveError)
    async def on_error(request: Request, exc: BlipserveError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            {"message": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers
        )

    @app.exception_handler(Exception)
    async def on_crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return JSONResponse({"message": f"internal error: {type(exc).__name__}"}, status_code=500)

    @app.get("/", response_class=PlainTextResponse, summary="Liveness")
    async def liveness() -> str:
        return "Healthy"

    @app.get(
        "/ready",
        summary="Readiness: 200 once the model is loaded and warmed up",
        responses={503: ERROR_RESPONSES[503]},
    )
    async def readiness() -> JSONResponse:
        if state.ready and state.engine is not None:
            return JSONResponse(
                {"status": "ready", "model": state.model.model, "kind": state.engine.adapter.kind}
            )
        why = state.load_error or "the model is still loading"
        return JSONResponse(
            {"message": f"not ready: {why}"}, status_code=503, headers={"Retry-After": "5"}
        )

    @app.post(
        "/score",
        summary="Score rows in the Azure ML catalog's contract",
        response_model=list[ScoreAnswer],
        responses=ERROR_RESPONSES,
        openapi_extra=SCORE_OPENAPI,
    )
    async def score(request: Request) -> JSONResponse:
        check_auth(request, cfg.api_keys)
        deadline = asyncio.get_running_loop().time() + cfg.request_timeout_s
        body = await read_json_body(request, cfg.max_body_bytes)
        parsed = parse_request(body, max_rows=cfg.max_rows)
        predictions = await unless_disconnected(
            request, pipeline.predict(parsed.rows, parsed.params, deadline)
        )
        return JSONResponse(encode_response(predictions))

    @app.post(
        "/v1/chat/completions",
        summary="OpenAI-compatible chat completion on one image",
        responses=ERROR_RESPONSES,
        openapi_extra=CHAT_OPENAPI,
    )
    async def chat(request: Request) -> JSONResponse:
        check_auth(request, cfg.api_keys)
        deadline = asyncio.get_running_loop().time() + cfg.request_timeout_s
        body = await read_json_body(request, cfg.max_body_bytes)
        req = openai_contract.parse_chat_request(body)
        engine, _ = pipeline.ready_parts()
        prompt = openai_contract.build_prompt(req, engine.adapter.text_role)
        row = RowInput(0, req.image, prompt)
        try:
            [prediction] = await unless_disconnected(
                request, pipeline.predict([row], req.params, deadline)
            )
        except RowError as exc:
            raise InvalidInput(f"messages: {exc.reason}") from None
        prompt_tokens = engine.adapter.count_tokens(prompt)
        completion = prediction.tokens or 0
        limit = req.params.max_new_tokens or engine.adapter.default_max_new_tokens
        return JSONResponse(
            openai_contract.chat_response(
                model=req.model,
                text=prediction.text,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion,
                finish_reason="length" if completion >= limit else "stop",
                request_id=request.state.request_id,
            )
        )

    @app.get(
        "/v1/models",
        summary="OpenAI-compatible list of the one model served",
        responses={401: ERROR_RESPONSES[401]},
    )
    async def models(request: Request) -> JSONResponse:
        check_auth(request, cfg.api_keys)
        return JSONResponse(openai_contract.models_response(state.model.model))

    @app.get(
        "/metrics",
        summary="Prometheus metrics",
        response_class=PlainTextResponse,
        responses=json_errors(401),
    )
    async def metrics(request: Request) -> Response:
        check_auth(request, cfg.api_keys)
        if state.batcher is not None:
            state.metrics.queue_rows.set(state.batcher.depth)
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")

    # The page for trying the model (static, so open; the calls it makes carry the key).
    app.mount("/ui", ui.static_app(), name="ui")
    return app


def _document_hand_parsed_bodies(app: FastAPI) -> None:
    """Move the schemas that blipserve.openapi attaches to operations into components."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = build()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for path_item in schema.get("paths", {}).values():
            for operation in path_item.values():
                components.update(operation.pop("x-blipserve-schemas", {}))
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


class _Server(uvicorn.Server):
    """uvicorn's server, writing the bound port to a file once listening (for --port 0)."""

    def __init__(self, config: uvicorn.Config, port_file: str | None) -> None:
        super().__init__(config)
        self.port_file = port_file

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        captured = getattr(self, "_captured_signals", None)
        if sig == signal.SIGTERM and isinstance(captured, list) and sig in captured:
            # SIGTERM is an orchestrator's normal "stop": once in-flight requests are done
            # we exit 0, where uvicorn would re-raise it and die by the signal.
            captured.remove(sig)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.port_file and self.servers:
            port = self.servers[0].sockets[0].getsockname()[1]
            tmp = Path(self.port_file + ".tmp")
            tmp.write_text(f"{port}\n")
            tmp.replace(self.port_file)  # atomic: a reader never sees a partial file


def serve(
    model: ModelConfig,
    *,
    engine_config: EngineConfig,
    limits: ImageLimits,
    fetch: FetchConfig,
    server: ServerConfig,
    port_file: str | None = None,
) -> int:
    """Run the server until SIGINT/SIGTERM (in-flight requests finish); the exit code."""
    app = create_app(model, engine_config=engine_config, limits=limits, fetch=fetch, server=server)
    config = uvicorn.Config(
        app,
        host=server.host,
        port=server.port,
        log_level=server.log_level,
        timeout_graceful_shutdown=int(server.graceful_timeout_s),
        access_log=False,
    )
    runner = _Server(config, port_file)
    state: ServerState = app.state.blipserve

    def stop() -> None:
        runner.should_exit = True

    state.on_load_failure = stop
    runner.run()
    return 1 if state.load_error else 0
