"""OpenTelemetry traces of requests: ``blipserve serve --otel`` (pip install
'blipserve[otel]').

Each HTTP request gets a server span (``POST /score``), a child of the caller's span when
the request carries a W3C ``traceparent`` header (so a request can be followed from the
client, through Ray Serve's proxy, into a replica), with child spans for what the engine
did for it: ``fetch`` (an image URL's download), ``decode`` (each row's image), ``queue``
(the wait for a batch) and ``model`` (the call that ran it; ``batch_rows`` says how many
rows of all requests it held).  The engine records when those ran
(:class:`~blipserve.engine.trace.RequestTrace`); the spans are made from those times once
the request is answered.

Spans go to the process's tracer provider when one is set (``opentelemetry-instrument``,
or an application embedding the app); otherwise blipserve sets one that exports over
OTLP as the standard ``OTEL_*`` variables say (``OTEL_EXPORTER_OTLP_ENDPOINT``,
``OTEL_SERVICE_NAME``, ...).
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from blipserve.engine.trace import RequestTrace
from blipserve.errors import InvalidInput

log = logging.getLogger(__name__)

NEEDS_OTEL = "--otel needs OpenTelemetry: pip install 'blipserve[otel]'"


def tracer_of(provider: Any | None = None) -> Any:
    """blipserve's tracer from ``provider``, else from the process's provider (set up here
    with an OTLP exporter when the process has none)."""
    try:
        trace: Any = importlib.import_module("opentelemetry.trace")
    except ImportError:
        raise InvalidInput(NEEDS_OTEL) from None
    if provider is None:
        provider = trace.get_tracer_provider()
        if type(provider).__name__ == "ProxyTracerProvider":  # nobody set one: ours
            provider = _otlp_provider()
            trace.set_tracer_provider(provider)
    return provider.get_tracer("blipserve", _version())


def traced(request: Request) -> RequestTrace | None:
    """The request's trace, for the engine to fill in; None when requests are not traced."""
    trace = getattr(request.state, "trace", None)
    return trace if isinstance(trace, RequestTrace) else None


class TraceRequests:
    """ASGI middleware: a server span per HTTP request, with the engine's stages as its
    children; ``request.state.trace`` is the :class:`RequestTrace` routes hand the engine."""

    def __init__(self, app: ASGIApp, tracer: Any) -> None:
        self.app = app
        self.tracer = tracer
        self.api: Any = importlib.import_module("opentelemetry.trace")
        self.propagate: Any = importlib.import_module("opentelemetry.propagate")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        parent = self.propagate.extract(headers)
        method, path = scope.get("method", ""), scope["path"]
        record = RequestTrace()
        scope.setdefault("state", {})["trace"] = record
        status = 500

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        span = self.tracer.start_span(
            f"{method} {path}",
            context=parent,
            kind=self.api.SpanKind.SERVER,
            attributes={"http.request.method": method, "url.path": path},
        )
        try:
            await self.app(scope, receive, send_and_note)
        finally:
            span.set_attribute("http.response.status_code", status)
            request_id = scope["state"].get("request_id")
            if request_id:
                span.set_attribute("blipserve.request_id", request_id)
            if status >= 500:
                span.set_status(self.api.Status(self.api.StatusCode.ERROR))
            within = self.api.set_span_in_context(span)
            for stage in record.intervals():
                child = self.tracer.start_span(
                    stage.name,
                    context=within,
                    start_time=stage.start_ns,
                    attributes={f"blipserve.{k}": v for k, v in stage.attributes.items()},
                )
                child.end(end_time=stage.end_ns)
            span.end()


def _otlp_provider() -> Any:
    sdk: Any = importlib.import_module("opentelemetry.sdk.trace")
    export: Any = importlib.import_module("opentelemetry.sdk.trace.export")
    provider = sdk.TracerProvider()  # its resource reads OTEL_SERVICE_NAME and the like
    try:
        otlp: Any = importlib.import_module("opentelemetry.exporter.otlp.proto.http.trace_exporter")
    except ImportError:
        log.warning(
            "--otel: no tracer provider is set and no OTLP exporter is installed "
            "(pip install opentelemetry-exporter-otlp-proto-http): spans go nowhere"
        )
        return provider
    provider.add_span_processor(export.BatchSpanProcessor(otlp.OTLPSpanExporter()))
    return provider


def _version() -> str:
    return str(importlib.import_module("blipserve").__version__)
