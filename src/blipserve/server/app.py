"""The FastAPI app: the catalog's ``/score``, the OpenAI chat route, health and metrics.

Each route checks the key, reads the body, parses it with :mod:`blipserve.contracts`, asks
the online engine (:class:`~blipserve.engine.online.OnlineEngine`) and encodes the
answer; typed errors become responses in :func:`blipserve.server.http.error_response`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from blipserve import ui
from blipserve.config import ServerConfig, Settings
from blipserve.contracts import openai as openai_contract
from blipserve.contracts.catalog import encode_response, parse_request
from blipserve.engine import Engine, prompt_of
from blipserve.engine.online import OnlineEngine
from blipserve.engine.online_queue import BehindPolicy
from blipserve.errors import (
    BlipserveError,
    InvalidInput,
    ModelLoadError,
    ModelNotReady,
    RowError,
)
from blipserve.jobs import runners
from blipserve.jobs.host import JobHost
from blipserve.jobs.worker import RunJob
from blipserve.server.batch_jobs import batch_jobs_router
from blipserve.server.chat_stream import stream_chat
from blipserve.server.docs import serve_docs
from blipserve.server.http import (
    RequestContext,
    check_auth,
    error_field,
    error_response,
    read_json_body,
    run_fn_exec_ms,
    unless_disconnected,
)
from blipserve.server.metrics import Metrics
from blipserve.server.open_inference import open_inference_router
from blipserve.server.openapi import (
    CHAT_OPENAPI,
    CHAT_RESPONSES,
    ERROR_RESPONSES,
    SCORE_OPENAPI,
    SCORE_RESPONSES,
    ScoreAnswerSchema,
    json_errors,
)
from blipserve.server.tracing import TraceRequests, traced, tracer_of
from blipserve.types import RowInput

log = logging.getLogger(__name__)


@dataclass
class ServerState:
    """What the routes share; filled in by the loader thread."""

    settings: Settings
    metrics: Metrics = field(default_factory=Metrics)
    online: OnlineEngine | None = None
    ready: bool = False
    load_error: str | None = None
    on_load_failure: Callable[[], None] | None = None
    jobs: JobHost | None = None  # the batch endpoint (--jobs-dir), open before the model

    def load(self, engine: Engine | None = None) -> None:
        """Load the model (unless given), warm up, start the queue, then report ready."""
        try:
            if engine is None:
                engine = Engine.from_settings(self.settings)
            if self.server.warmup:
                engine.warm_up()
            online = OnlineEngine(
                engine,
                max_wait_s=self.server.max_wait_ms / 1000,
                max_queue=self.server.max_queue,
                observer=self.metrics,
                behind=BehindPolicy(share=self.settings.jobs.jobs_share),
            )
            online.start()
            self.online = online
            if self.jobs is not None:  # jobs queued (or left by a stopped server) start now
                self.jobs.start(self._run_jobs(engine, online))
            self.ready = True
            log.info("ready: %s (%s)", self.settings.model.model, engine.adapter.kind)
        except Exception as exc:
            self.load_error = (
                exc.message if isinstance(exc, BlipserveError) else f"{type(exc).__name__}: {exc}"
            )
            if isinstance(exc, BlipserveError):
                log.error("could not start: %s", exc.message)
            else:
                log.exception("could not start")
            if self.on_load_failure:
                self.on_load_failure()

    def _run_jobs(self, engine: Engine, online: OnlineEngine) -> RunJob:
        if self.settings.jobs.jobs_on_ray:
            return runners.on_ray(self.settings)
        return runners.on_engine(engine, online.queue)

    def open_jobs(self) -> None:
        """The job table (``--jobs-dir``), read before the model loads: POST /jobs queues
        jobs while it loads."""
        if self.settings.jobs.jobs_dir is not None:
            self.jobs = JobHost(self.settings)

    @property
    def server(self) -> ServerConfig:
        return self.settings.server

    def ready_engine(self) -> OnlineEngine:
        """The online engine; :class:`ModelNotReady` (503) until it is loaded and warm."""
        if not self.ready or self.online is None:
            raise ModelNotReady(f"not ready: {self.load_error or 'the model is still loading'}")
        return self.online

    def health_problem(self) -> str | None:
        """Why this server cannot answer requests now (for a replica's health check), or
        None: not loaded, failed to load, or its model thread is gone."""
        if self.load_error is not None:
            return f"the model failed to load: {self.load_error}"
        if not self.ready or self.online is None:
            return "the model is still loading"
        if not self.online.queue.alive:
            return "the model thread is not running"
        return None

    def shutdown(self) -> None:
        if self.jobs:  # first: running jobs stop where they are, resumed by the next server
            self.jobs.stop(timeout=self.server.graceful_timeout_s)
        if self.online:
            self.online.stop(timeout=self.server.graceful_timeout_s)


def create_app(
    settings: Settings | None = None,
    *,
    engine: Engine | None = None,
    load_in_background: bool = True,
    tracer_provider: Any | None = None,
) -> FastAPI:
    """The ASGI app for ``settings`` (default: every default). The model loads in a
    background thread after startup (``/ready`` answers 503 until it is loaded and warmed
    up); pass ``engine`` to serve one you have.

    ``load_in_background=False``: startup itself loads and warms up (off the event loop),
    and fails when loading fails — for hosts that route traffic to an app only once its
    startup is done (a Ray Serve replica).  ``tracer_provider``: trace requests to this
    OpenTelemetry provider (``--otel`` traces to the process's own).
    """
    state = ServerState(settings or Settings())
    cfg = state.server

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The model loads and warms up on a thread of its own that then ends: while a thread
        # that ran the model lives on (the event loop's, an executor's), the model thread
        # ran BLIP-base 1.5x slower here (0.60 vs 0.39 s a caption, 2 cores; its OpenMP and
        # OpenVINO thread pools stay bound to it).
        await asyncio.to_thread(state.open_jobs)
        loader = threading.Thread(
            target=state.load, args=(engine,), name="blipserve-load", daemon=True
        )
        loader.start()
        if not load_in_background:
            await asyncio.to_thread(loader.join)
            if state.load_error is not None:
                raise ModelLoadError(f"could not start: {state.load_error}")
        yield
        await asyncio.to_thread(state.shutdown)

    app = FastAPI(
        title="blipserve",
        summary="BLIP and BLIP-2 image-to-text models behind the Azure ML catalog's contract.",
        description="Try the model in a browser: [/ui/](/ui/).",
        version=__import__("blipserve").__version__,
        openapi_url="/swagger.json",
        docs_url=None,  # served by serve_docs, without a CDN
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.blipserve = state
    app.add_middleware(RequestContext, metrics=state.metrics)
    if cfg.otel or tracer_provider is not None:  # outermost: the span covers everything
        app.add_middleware(TraceRequests, tracer=tracer_of(tracer_provider))
    _document_hand_parsed_bodies(app)
    serve_docs(app)

    @app.exception_handler(BlipserveError)
    async def on_error(request: Request, exc: BlipserveError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        field = error_field(request.url.path)  # /v2 answers {"error": ...}
        return JSONResponse(
            {field: str(exc.detail)}, status_code=exc.status_code, headers=exc.headers
        )

    @app.exception_handler(Exception)
    async def on_crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return JSONResponse({"message": f"internal error: {type(exc).__name__}"}, status_code=500)

    def deadline() -> float:
        return asyncio.get_running_loop().time() + cfg.request_timeout_s

    @app.get("/", response_class=PlainTextResponse, summary="Liveness")
    async def liveness() -> str:
        return "Healthy"

    @app.get(
        "/ready",
        summary="Readiness: 200 once the model is loaded and warmed up",
        responses={503: ERROR_RESPONSES[503]},
    )
    async def readiness() -> JSONResponse:
        adapter = state.ready_engine().engine.adapter
        return JSONResponse(
            {
                "status": "ready",
                "model": state.settings.model.model,
                "kind": adapter.kind,
                # how the model was built: each step, what runs it, and any skipped, why
                "build": [step.as_dict() for step in adapter.build],
            }
        )

    @app.post(
        "/score",
        summary="Score rows in the Azure ML catalog's contract",
        response_model=list[ScoreAnswerSchema],
        responses=SCORE_RESPONSES,
        openapi_extra=SCORE_OPENAPI,
    )
    async def score(request: Request) -> JSONResponse:
        check_auth(request, cfg.api_keys)
        until = deadline()
        body = await read_json_body(request, cfg.max_body_bytes)
        started = time.perf_counter()  # the catalog's server times its run() on the read body
        parsed = parse_request(body, max_rows=cfg.max_rows)
        online = state.ready_engine()
        predictions = await unless_disconnected(
            request, online.predict(parsed.rows, parsed.params, until, trace=traced(request))
        )
        return JSONResponse(encode_response(predictions), headers=run_fn_exec_ms(started))

    @app.post(
        "/v1/chat/completions",
        summary="OpenAI-compatible chat completion on one image",
        responses=CHAT_RESPONSES,
        openapi_extra=CHAT_OPENAPI,
    )
    async def chat(request: Request) -> Response:
        check_auth(request, cfg.api_keys)
        until = deadline()
        req = openai_contract.parse_chat_request(await read_json_body(request, cfg.max_body_bytes))
        online = state.ready_engine()
        adapter = online.engine.adapter
        prompt = prompt_of(adapter, req.question, "chat", req.history)
        if req.stream:
            return await stream_chat(request, online, req, prompt, until)
        try:
            [prediction] = await unless_disconnected(
                request,
                online.predict(
                    [RowInput(0, req.image, prompt)], req.params, until, trace=traced(request)
                ),
            )
        except RowError as exc:
            raise InvalidInput(f"messages: {exc.reason}") from None
        limit = req.params.max_new_tokens or adapter.default_max_new_tokens
        return JSONResponse(
            openai_contract.chat_response(
                model=req.model,
                choices=openai_contract.choices_of(prediction, limit),
                prompt_tokens=adapter.count_tokens(prompt),
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
        return JSONResponse(openai_contract.models_response(state.settings.model.model))

    @app.get(
        "/metrics",
        summary="Prometheus metrics",
        response_class=PlainTextResponse,
        responses=json_errors(401),
    )
    async def metrics(request: Request) -> Response:
        check_auth(request, cfg.api_keys)
        if state.online is not None:
            state.metrics.queue_rows.set(state.online.queue.depth)
            sizer = state.online.engine.runner.sizer
            state.metrics.memory(sizer.out_of_memory_calls, sizer.smallest())
        if state.jobs is not None:
            state.metrics.jobs_by_status(state.jobs.counts())
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")

    app.include_router(open_inference_router(state))  # KServe's Open Inference Protocol (v2)
    app.include_router(batch_jobs_router(state))  # the catalog's batch endpoint (/jobs)
    # The page for trying the model (static, so open; the calls it makes carry the key).
    app.mount("/ui", ui.static_app(), name="ui")
    return app


def _document_hand_parsed_bodies(app: FastAPI) -> None:
    """Move the schemas that blipserve.server.openapi attaches to operations into components."""
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
