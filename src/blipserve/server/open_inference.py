"""KServe's Open Inference Protocol (v2 REST) over the online engine: health, metadata, infer.

The same engine, batching, limits, key and metrics as ``/score``; the wire format (JSON or
JSON followed by binary tensors) is :mod:`blipserve.contracts.open_inference`.  Errors are
the protocol's ``{"error": ...}`` bodies with the statuses blipserve gives everywhere (400
naming the row, 401, 404 for a model this server does not serve, 413, 415, 500, 503 with
``Retry-After``, 504).

The model answers to the ``--model`` value as given (``demo``, ``Salesforce/blip-itm-base-
coco``, a folder) and to ``blipserve``, under version ``1``.  The health and readiness
routes are open, as ``/`` and ``/ready`` are; metadata and inference need the key.
"""

from __future__ import annotations

import asyncio
import logging
import math
import zlib
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute

import blipserve
from blipserve.contracts.open_inference import (
    ALIAS,
    check_model,
    encode_infer_response,
    model_metadata,
    model_outputs,
    parse_infer_request,
    server_metadata,
)
from blipserve.contracts.open_inference_binary import HEADER_LENGTH, parse_header_length
from blipserve.errors import (
    BlipserveError,
    InvalidRequest,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from blipserve.server.http import check_auth, error_response, read_body, unless_disconnected
from blipserve.server.openapi import (
    INFER_OPENAPI,
    INFER_RESPONSES,
    ModelMetadataSchema,
    ModelReadySchema,
    ServerMetadataSchema,
    v2_errors,
)
from blipserve.server.tracing import traced

if TYPE_CHECKING:
    from blipserve.models.protocol import Adapter
    from blipserve.server.app import ServerState

log = logging.getLogger(__name__)

#: request bodies: JSON, or JSON then binary tensors (clients send either type, or none)
_BODY_TYPES = ("", "application/json", "application/octet-stream")
_ENCODINGS = ("gzip", "deflate")


class OpenInferenceRoute(APIRoute):
    """A route whose errors are the protocol's ``{"error": ...}`` bodies."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def handle_errors(request: Request) -> Response:
            try:
                return await handle(request)
            except BlipserveError as exc:
                return error_response(exc, field="error")
            except Exception as exc:
                log.exception("unexpected error on %s", request.url.path)
                return JSONResponse(
                    {"error": f"internal error: {type(exc).__name__}"}, status_code=500
                )

        return handle_errors


def open_inference_router(state: ServerState) -> APIRouter:
    """The ``/v2`` routes over ``state``'s engine (once it is loaded)."""
    cfg = state.server
    served = state.settings.model.model
    router = APIRouter(route_class=OpenInferenceRoute, tags=["Open Inference Protocol (v2)"])

    def loaded() -> Adapter:
        return state.ready_engine().engine.adapter

    @router.get("/v2/health/live", summary="Liveness (v2)")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @router.get(
        "/v2/health/ready",
        summary="Readiness (v2): 200 once the model is loaded and warmed up",
        responses=v2_errors(503),
    )
    async def ready() -> dict[str, bool]:
        loaded()
        return {"ready": True}

    @router.get(
        "/v2",
        summary="Server metadata (v2)",
        response_model=ServerMetadataSchema,
        responses=v2_errors(401),
    )
    async def metadata(request: Request) -> dict[str, Any]:
        check_auth(request, cfg.api_keys)
        return server_metadata(blipserve.__version__)

    # Each route reads the model's name (and version) from the path itself: a name may hold
    # slashes (hub ids), and the /versions/{model_version} forms share the endpoints.
    def check_named(request: Request) -> None:
        params = request.path_params
        check_model(params["model_name"], params.get("model_version"), served)

    async def model_ready(request: Request) -> dict[str, Any]:
        check_named(request)
        loaded()
        return {"name": served, "ready": True}

    async def model(request: Request) -> dict[str, Any]:
        check_auth(request, cfg.api_keys)
        check_named(request)
        adapter = loaded()
        return model_metadata(served, platform=adapter.kind, matching=adapter.text_role == "match")

    async def infer(request: Request) -> Response:
        check_auth(request, cfg.api_keys)
        started = asyncio.get_running_loop().time()
        check_named(request)
        body = await read_infer_body(request, cfg.max_body_bytes)
        header_length = parse_header_length(request.headers.get(HEADER_LENGTH), len(body))
        parsed = parse_infer_request(body, header_length, max_rows=cfg.max_rows)
        online = state.ready_engine()
        matching = online.engine.adapter.text_role == "match"
        parsed.check_outputs(model_outputs(matching))
        timeout_s = min(cfg.request_timeout_s, parsed.timeout_s or math.inf)
        predictions = await unless_disconnected(
            request,
            online.predict(parsed.rows, parsed.params, started + timeout_s, trace=traced(request)),
        )
        answer = encode_infer_response(parsed, predictions, model_name=served, matching=matching)
        if answer.header_length is None:
            return Response(answer.body, media_type="application/json")
        return Response(
            answer.body,
            media_type="application/octet-stream",
            headers={HEADER_LENGTH: str(answer.header_length)},
        )

    # The /versions/{model_version} forms first, or the plain forms' {model_name:path}
    # would take "NAME/versions/1" for a name.
    name = "/v2/models/{model_name:path}"
    versioned = f"{name}/versions/{{model_version}}"
    hidden: dict[str, Any] = {"include_in_schema": False}
    model_name = _model_name(served)
    router.add_api_route(f"{versioned}/ready", model_ready, **hidden)
    router.add_api_route(f"{versioned}/infer", infer, methods=["POST"], **hidden)
    router.add_api_route(versioned, model, **hidden)
    router.add_api_route(
        f"{name}/ready",
        model_ready,
        summary="Model readiness (v2)",
        response_model=ModelReadySchema,
        responses=v2_errors(404, 503),
        openapi_extra={"parameters": [model_name]},
    )
    router.add_api_route(
        f"{name}/infer",
        infer,
        methods=["POST"],
        summary="Inference (v2): image and text tensors in, text tensors out",
        responses=INFER_RESPONSES,
        openapi_extra={**INFER_OPENAPI, "parameters": [model_name, _HEADER_LENGTH]},
    )
    router.add_api_route(
        name,
        model,
        summary="Model metadata (v2)",
        response_model=ModelMetadataSchema,
        responses=v2_errors(401, 404, 503),
        openapi_extra={"parameters": [model_name]},
    )
    return router


def _model_name(served: str) -> dict[str, Any]:
    """The path parameter, documented with the names this server answers to."""
    return {
        "name": "model_name",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "enum": list(dict.fromkeys([served, ALIAS]))},
        "description": f"the --model value the server was started with, or {ALIAS!r}",
        "example": ALIAS,
    }


_HEADER_LENGTH: dict[str, Any] = {
    "name": HEADER_LENGTH,
    "in": "header",
    "required": False,
    "schema": {"type": "integer", "minimum": 1},
    "description": "binary tensor data extension: the length of the JSON at the start of "
    "the body, before the binary tensors",
}


async def read_infer_body(request: Request, limit: int) -> bytes:
    """The body: JSON, or JSON then binary tensors, maybe gzip- or deflate-encoded; 415 for
    another type or encoding, 413 past ``limit`` bytes (sent or decompressed)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in _BODY_TYPES and not content_type.endswith("+json"):
        raise UnsupportedMediaType(
            "the body must be JSON, or JSON followed by binary tensors (Content-Type: "
            f"application/json or application/octet-stream), got {content_type!r}"
        )
    body = await read_body(request, limit)
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding == "identity":
        return body
    if encoding not in _ENCODINGS:
        raise UnsupportedMediaType(
            f"Content-Encoding {encoding!r} is not supported: send gzip, deflate or none"
        )
    return _inflate(body, encoding, limit)


def _inflate(body: bytes, encoding: str, limit: int) -> bytes:
    # 32 + 15: a gzip or zlib header, detected (deflate on the web means zlib's format)
    inflater = zlib.decompressobj(32 + zlib.MAX_WBITS)
    try:
        data = inflater.decompress(body, limit + 1)  # never more than the limit in memory
    except zlib.error as exc:
        raise InvalidRequest(f"the body is not valid {encoding} data: {exc}") from None
    if len(data) > limit:
        raise PayloadTooLarge(
            f"the body is larger than the limit of {limit} bytes once decompressed"
        )
    if not inflater.eof:
        raise InvalidRequest(f"the {encoding} body ends before its compressed data does")
    if inflater.unused_data:  # bytes after the stream's end: another member, or garbage
        raise InvalidRequest(
            f"the {encoding} body has {len(inflater.unused_data)} bytes after its compressed "
            "data: send one stream"
        )
    return data
