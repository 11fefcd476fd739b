"""OpenAPI descriptions of the routes whose bodies we parse by hand.

``/score`` and ``/v1/chat/completions`` read their bodies themselves
(:mod:`blipserve.contracts`, so that every error names the row and the reason, in our
message format); these ``...Schema`` models only document them in ``/swagger.json``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from blipserve.params import GenerationParams

_PNG_1PX = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"
)


class SplitInputSchema(BaseModel):
    """pandas ``to_json(orient="split")`` layout."""

    columns: list[str] = Field(
        description="'image' and optionally 'text'; other columns are ignored",
        examples=[["image", "text"]],
    )
    index: list[Any] | None = Field(None, description="row labels, echoed in error messages")
    data: list[list[Any]] = Field(
        description="rows; 'image' is an http(s) URL or base64 (line breaks and a "
        "data:image/...;base64, prefix allowed); 'text' a prefix, question or prompt"
    )


class ScoreRequestSchema(BaseModel):
    input_data: SplitInputSchema | list[dict[str, Any]] = Field(
        description="split layout, or a list of records {image, text}"
    )
    params: GenerationParams | None = Field(None, description="generation settings")


class ScoreAnswerSchema(BaseModel):
    text: str = Field(description="caption, answer, or match probability as text")
    score: float | None = Field(None, description="match probability (image-text matching)")
    texts: list[str] | None = Field(
        None,
        description="every text, best first (only when params.num_return_sequences is above 1)",
    )


class ErrorBodySchema(BaseModel):
    message: str = Field(description="what was wrong, naming the row where there is one")


class ImageUrlSchema(BaseModel):
    url: str = Field(description="http(s) URL or data:image/...;base64,... URL")


class ContentPartSchema(BaseModel):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageUrlSchema | None = None


class ChatMessageSchema(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPartSchema]


class StreamOptionsSchema(BaseModel):
    include_usage: bool | None = Field(
        None, description="a last chunk with the usage and no choices"
    )


class ChatRequestSchema(BaseModel):
    model: str
    messages: list[ChatMessageSchema]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = Field(
        None, ge=1, le=16, description="answers (choices): the best beams, or samples"
    )
    stream: bool | None = Field(
        None,
        description="answer as server-sent events (chat.completion.chunk), the text as it "
        "is decoded, ending with 'data: [DONE]'",
    )
    stream_options: StreamOptionsSchema | None = Field(None, description="only with stream")


def request_body(model: type[BaseModel], examples: dict[str, Any]) -> dict[str, Any]:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    defs = schema.pop("$defs", {})
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": schema, "examples": examples}},
        },
        # picked up by blipserve.server.app's openapi hook into components/schemas
        "x-blipserve-schemas": defs,
    }


SCORE_OPENAPI = request_body(
    ScoreRequestSchema,
    {
        "caption": {
            "summary": "Caption images (URL or base64)",
            "value": {
                "input_data": {
                    "columns": ["image"],
                    "index": [0, 1],
                    "data": [["https://example.com/dog.jpg"], [_PNG_1PX]],
                }
            },
        },
        "image+text": {
            "summary": "Question, prompt or caption prefix per image",
            "value": {
                "input_data": {
                    "columns": ["image", "text"],
                    "index": [0],
                    "data": [[_PNG_1PX, "what color is the square?"]],
                },
                "params": {"max_new_tokens": 20, "num_beams": 3},
            },
        },
    },
)

CHAT_OPENAPI = request_body(
    ChatRequestSchema,
    {
        "question": {
            "summary": "Ask about an image",
            "value": {
                "model": "blipserve",
                "max_tokens": 20,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "image_url",
                                "image_url": {"url": f"data:image/png;base64,{_PNG_1PX}"},
                            },
                            {"type": "text", "text": "what color is the square?"},
                        ],
                    }
                ],
            },
        }
    },
)

ERROR_DESCRIPTIONS = {
    400: "Bad input; the message names the row and the reason",
    401: "Missing or wrong API key",
    413: "Body too large",
    415: "Body is not JSON",
    431: "A request id header (x-request-id, x-ms-request-id, x-ms-client-request-id) is "
    "longer than 100 characters",
    500: "The model failed on this request's batch",
    503: "Not ready, or the queue is full (see Retry-After)",
    504: "The request's deadline passed",
}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBodySchema, "description": description}
    for status, description in ERROR_DESCRIPTIONS.items()
}
CHAT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "A chat.completion; with stream, chat.completion.chunk events (errors "
        "before the first chunk are JSON errors with their status, after it an 'error' event)",
        "content": {
            "application/json": {},
            "text/event-stream": {
                "schema": {"type": "string"},
                "example": 'data: {"object":"chat.completion.chunk","choices":[{"index":0,'
                '"delta":{"content":"a cat"},"finish_reason":null}], ...}\n\n'
                "data: [DONE]\n\n",
            },
        },
    },
    **ERROR_RESPONSES,
}
SCORE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "headers": {
            "x-ms-run-fn-exec-ms": {
                "description": "milliseconds the scoring took (parsing, queue, model, "
                "encoding), as the Azure ML catalog's server reports it",
                "schema": {"type": "string", "examples": ["412.305"]},
            }
        }
    },
    **ERROR_RESPONSES,
}


# -- the Open Inference Protocol (v2): blipserve.server.open_inference ---------------------


class V2ErrorSchema(BaseModel):
    error: str = Field(description="what was wrong, naming the row or tensor where there is one")


class ServerMetadataSchema(BaseModel):
    name: str
    version: str
    extensions: list[str]


class TensorMetadataSchema(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1: any size")


class ModelMetadataSchema(BaseModel):
    name: str
    versions: list[str]
    platform: str = Field(description="the adapter, e.g. blip-caption, blip-itm, blip2")
    inputs: list[TensorMetadataSchema]
    outputs: list[TensorMetadataSchema]


class ModelReadySchema(BaseModel):
    name: str
    ready: bool


class InputParametersSchema(BaseModel):
    model_config = ConfigDict(extra="forbid")

    binary_data_size: int | None = Field(
        None, ge=0, description="binary tensor data extension: this input's bytes after the JSON"
    )
    content_type: str | None = Field(None, description="accepted, not used")


class RequestInputSchema(BaseModel):
    name: Literal["image", "text"]
    datatype: Literal["BYTES"]
    shape: list[int] = Field(description="[N] or [N, 1]; element i is row i", examples=[[1]])
    data: list[str] | list[list[str]] | None = Field(
        None,
        description="image: base64 (or a data URL) or an http(s) URL; text: the row's prefix, "
        "question or prompt. Absent when parameters.binary_data_size is given",
    )
    parameters: InputParametersSchema | None = None


class OutputParametersSchema(BaseModel):
    model_config = ConfigDict(extra="forbid")

    binary_data: bool | None = Field(None, description="this output as binary after the JSON")


class RequestOutputSchema(BaseModel):
    name: Literal["text", "score", "texts"]
    parameters: OutputParametersSchema | None = None


class InferParametersSchema(GenerationParams):
    binary_data_output: bool | None = Field(None, description="every output in binary")
    timeout: int | None = Field(
        None, ge=1, description="microseconds: the request's deadline, if sooner than the server's"
    )


class InferRequestSchema(BaseModel):
    id: str | None = Field(None, description="echoed in the response")
    parameters: InferParametersSchema | None = Field(
        None, description="generation settings (as /score's params) and the protocol's"
    )
    inputs: list[RequestInputSchema]
    outputs: list[RequestOutputSchema] | None = Field(
        None, description="default: text (and score, or texts, where the model gives them)"
    )


class BinaryDataSizeSchema(BaseModel):
    binary_data_size: int


class ResponseOutputSchema(BaseModel):
    name: str
    datatype: Literal["BYTES", "FP32"]
    shape: list[int]
    data: list[str] | list[float] | None = None
    parameters: BinaryDataSizeSchema | None = None


class InferResponseSchema(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[ResponseOutputSchema]


_V2_ERROR_DESCRIPTIONS = {
    **ERROR_DESCRIPTIONS,
    404: "No such model (or version) here",
    415: "Body neither JSON nor JSON followed by binary tensors, or an unknown Content-Encoding",
}


def v2_errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The v2 routes' error responses: ``{"error": ...}``."""
    return {
        status: {"model": V2ErrorSchema, "description": _V2_ERROR_DESCRIPTIONS[status]}
        for status in statuses
    }


_BINARY = {"schema": {"type": "string", "format": "binary"}}
INFER_OPENAPI = request_body(
    InferRequestSchema,
    {
        "caption": {
            "summary": "Caption an image (base64 or an http(s) URL)",
            "value": {
                "id": "1",
                "parameters": {"max_new_tokens": 20},
                "inputs": [
                    {"name": "image", "datatype": "BYTES", "shape": [1], "data": [_PNG_1PX]}
                ],
            },
        }
    },
)
INFER_OPENAPI["requestBody"]["content"]["application/octet-stream"] = {
    **_BINARY,
    "description": "the JSON, then each binary input's bytes (binary tensor data extension)",
}
INFER_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "model": InferResponseSchema,
        "description": "The outputs; with binary outputs, the JSON then their bytes",
        "content": {"application/octet-stream": _BINARY},
        "headers": {
            "Inference-Header-Content-Length": {
                "description": "with binary outputs: the length of the JSON before them",
                "schema": {"type": "string"},
            }
        },
    },
    **v2_errors(400, 401, 404, 413, 415, 431, 500, 503, 504),
}


def json_errors(*statuses: int, **descriptions: str) -> dict[int | str, dict[str, Any]]:
    """Error responses documented as JSON on a route whose own answer is not JSON.

    (With ``model``, FastAPI would document them in the route's media type, e.g. text/plain.)
    """
    schema = ErrorBodySchema.model_json_schema()
    return {
        status: {
            "description": descriptions.get(f"s{status}") or ERROR_DESCRIPTIONS[status],
            "content": {"application/json": {"schema": schema}},
        }
        for status in statuses
    }
