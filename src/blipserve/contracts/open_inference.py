"""KServe's Open Inference Protocol (v2 REST) for BLIP models, with no HTTP in it.

Request, as JSON::

    {"id": "42", "parameters": {"max_new_tokens": 20},
     "inputs": [{"name": "image", "datatype": "BYTES", "shape": [2],
                 "data": ["<base64 or http(s) URL>", "..."]},
                {"name": "text", "datatype": "BYTES", "shape": [2],
                 "data": ["a picture of", ""]}],
     "outputs": [{"name": "text"}]}

or, with the binary tensor data extension, that JSON object (``inputs[].parameters.
binary_data_size`` in place of ``data``) followed by each binary input's bytes in order;
the caller passes the JSON's length (the ``Inference-Header-Content-Length`` header).  A
``BYTES`` element in binary is a 4-byte little-endian length and that many bytes: for
``image``, the image file's bytes (or, when they are printable ASCII, a URL or base64 text,
as in JSON); for ``text``, UTF-8.  Element ``i`` of each input is row ``i``.

``parameters`` holds the generation settings ``/score`` takes in ``params``
(:meth:`GenerationParams.parse`), beside the protocol's ``binary_data_output`` (every output
in binary) and ``timeout`` (microseconds, shortening the server's deadline).

Response: ``text`` (``BYTES [N]``), ``score`` (``FP32 [N]``, image-text matching models)
and ``texts`` (``BYTES [N, k]``, every text best first, when ``num_return_sequences`` is
``k > 1``), each as JSON ``data`` or, when asked for, binary after the JSON.  The binary
framing: :mod:`blipserve.contracts.open_inference_binary`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from blipserve.contracts.catalog import MAX_TEXT_CHARS
from blipserve.contracts.open_inference_binary import (
    HEADER_LENGTH,
    BinaryTensors,
    decode_bytes_tensor,
    encode_tensor,
    split_body,
)
from blipserve.errors import InferenceError, InvalidRequest, ModelNotFound, RowError
from blipserve.params import GenerationParams, json_type, load_json_object
from blipserve.types import Prediction, RowInput

IMAGE: Final = "image"
TEXT: Final = "text"
SCORE: Final = "score"
TEXTS: Final = "texts"
BYTES: Final = "BYTES"
FP32: Final = "FP32"
#: the one version each served model has (``/v2/models/NAME/versions/1/...``)
MODEL_VERSION: Final = "1"
#: the name clients may always use for the served model, whatever ``--model`` says
ALIAS: Final = "blipserve"
EXTENSIONS: Final = ("binary_tensor_data",)

_OUTPUTS: Final = (TEXT, SCORE, TEXTS)
_PROTOCOL_PARAMS: Final = ("binary_data_output", "timeout")
_INPUT_PARAMS: Final = ("binary_data_size", "content_type")
_PRINTABLE = frozenset(range(0x20, 0x7F)) | {0x09, 0x0A, 0x0D}

#: an input's element: text from JSON ``data``, bytes from binary data
Element = str | bytes


@dataclass(frozen=True)
class OutputRequest:
    """An output the client asked for, and whether it wants it in binary."""

    name: str
    binary: bool | None = None  # None: as the request's binary_data_output says


@dataclass(frozen=True)
class InferRequest:
    rows: list[RowInput]
    params: GenerationParams
    id: str | None = None
    #: the outputs asked for, in order; None: every output the model gives
    outputs: tuple[OutputRequest, ...] | None = None
    binary_output: bool = False
    #: the client's own deadline (the protocol's ``timeout``), in seconds
    timeout_s: float | None = None

    def check_outputs(self, available: Sequence[str]) -> None:
        """Refuse outputs this model does not give (400) before it runs."""
        for output in self.outputs or ():
            if output.name not in available:
                raise InvalidRequest(
                    f"outputs: this model gives {_names(available)}, not {output.name!r}"
                )


@dataclass(frozen=True)
class EncodedResponse:
    body: bytes
    header_length: int | None = None  # the JSON's, when binary tensors follow it


def model_outputs(matching: bool) -> tuple[str, ...]:
    """The outputs a model gives: matching models a probability, the others their texts."""
    return (TEXT, SCORE) if matching else (TEXT, TEXTS)


def check_model(name: str, version: str | None, served: str) -> None:
    """Raise :class:`ModelNotFound` (404) unless ``name`` (and ``version``) is the model
    served as ``served`` (the ``--model`` value) or as :data:`ALIAS`."""
    if name not in (served, ALIAS):
        raise ModelNotFound(f"no model {name!r} here: this server serves {served!r} (or {ALIAS!r})")
    if version is not None and version != MODEL_VERSION:
        raise ModelNotFound(f"model {name!r} has no version {version!r}; its one version is '1'")


def server_metadata(version: str) -> dict[str, Any]:
    return {"name": "blipserve", "version": version, "extensions": list(EXTENSIONS)}


def model_metadata(name: str, *, platform: str, matching: bool) -> dict[str, Any]:
    shapes = {TEXT: (BYTES, [-1]), SCORE: (FP32, [-1]), TEXTS: (BYTES, [-1, -1])}
    return {
        "name": name,
        "versions": [MODEL_VERSION],
        "platform": platform,
        "inputs": [_tensor(IMAGE, BYTES, [-1]), _tensor(TEXT, BYTES, [-1])],
        "outputs": [_tensor(out, *shapes[out]) for out in model_outputs(matching)],
    }


def _tensor(name: str, datatype: str, shape: list[int]) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape}


def parse_infer_request(
    body: bytes, header_length: int | None = None, *, max_rows: int = 1024
) -> InferRequest:
    """Validate an inference request: JSON, or JSON followed by binary tensors.

    Raises :class:`InvalidRequest` naming the tensor for a malformed body and
    :class:`RowError` naming the row (and the tensor) for a malformed element.
    """
    header, binary = split_body(body, header_length)
    try:
        request = load_json_object(header, "with an 'inputs' key")
    except InvalidRequest as exc:
        if header_length is None:
            raise
        # (tritonclient adds the header to the caller's headers dict, which may be reused)
        raise InvalidRequest(
            f"{exc.message} (read as the first {header_length} of {len(body)} bytes, as "
            f"{HEADER_LENGTH} says: is that header meant for this request?)"
        ) from None
    binary_output, timeout_s, params = _parameters(request.get("parameters"))
    tensors = _inputs(request.get("inputs"), binary, max_rows)
    if IMAGE not in tensors:
        found = ", ".join(map(repr, tensors)) or "none"
        raise InvalidRequest(f"the request has no 'image' input (inputs found: {found})")
    images, texts = tensors[IMAGE], tensors.get(TEXT)
    if texts is not None and len(texts) != len(images):
        raise InvalidRequest(
            f"input 'text' has {len(texts)} elements but input 'image' has {len(images)}: "
            "give one text per image"
        )
    rows = [
        RowInput(i, _image(i, image), _text(i, texts[i]) if texts is not None else None)
        for i, image in enumerate(images)
    ]
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidRequest(f"id must be a string, got {json_type(request_id)}")
    return InferRequest(
        rows=rows,
        params=params,
        id=request_id,
        outputs=_outputs(request.get("outputs")),
        binary_output=binary_output,
        timeout_s=timeout_s,
    )


def _parameters(raw: object) -> tuple[bool, float | None, GenerationParams]:
    if raw is None:
        return False, None, GenerationParams()
    if not isinstance(raw, Mapping):
        raise InvalidRequest(f"parameters must be a JSON object, got {json_type(raw)}")
    allowed = (*_PROTOCOL_PARAMS, *GenerationParams.allowed())
    unknown = sorted(str(key) for key in raw if key not in allowed)
    if unknown:
        raise InvalidRequest(
            f"parameters: unknown parameter(s) {', '.join(map(repr, unknown))}; "
            f"allowed: {', '.join(allowed)}"
        )
    binary = raw.get("binary_data_output", False)
    if not isinstance(binary, bool):
        raise InvalidRequest(f"parameters.binary_data_output must be true or false, got {binary!r}")
    timeout = raw.get("timeout")
    if timeout is not None and (type(timeout) is not int or timeout <= 0):
        raise InvalidRequest(f"parameters.timeout must be microseconds (over 0), got {timeout!r}")
    generation = {k: v for k, v in raw.items() if k not in _PROTOCOL_PARAMS}
    timeout_s = timeout / 1e6 if timeout is not None else None
    return binary, timeout_s, GenerationParams.parse(generation, where="parameters")


def _inputs(raw: object, binary: BinaryTensors, max_rows: int) -> dict[str, list[Element]]:
    if not isinstance(raw, list) or not raw:
        got = "an empty array" if raw == [] else json_type(raw)
        raise InvalidRequest(f"inputs must be a non-empty array of tensors, got {got}")
    tensors: dict[str, list[Element]] = {}
    for k, tensor in enumerate(raw):
        if not isinstance(tensor, Mapping):
            raise InvalidRequest(f"inputs[{k}] must be an object, got {json_type(tensor)}")
        name = tensor.get("name")
        if name is None:
            raise InvalidRequest(f"inputs[{k}] has no 'name' ('image' or 'text')")
        if name not in (IMAGE, TEXT):
            raise InvalidRequest(
                f"inputs[{k}]: unknown input {name!r}; this model takes 'image' and optionally "
                "'text'"
            )
        if name in tensors:
            raise InvalidRequest(f"input {name!r} is given twice")
        tensors[name] = _elements(name, tensor, binary, max_rows)
    binary.check_all_taken()
    return tensors


def _elements(
    name: str, tensor: Mapping[str, Any], binary: BinaryTensors, max_rows: int
) -> list[Element]:
    datatype = tensor.get("datatype")
    if datatype != BYTES:
        raise InvalidRequest(f"input {name!r}: datatype must be 'BYTES', got {datatype!r}")
    count = _rows(name, tensor.get("shape"), max_rows)
    parameters = tensor.get("parameters") or {}
    if not isinstance(parameters, Mapping):
        raise InvalidRequest(
            f"input {name!r}: parameters must be an object, got {json_type(parameters)}"
        )
    unsupported = sorted(str(key) for key in parameters if key not in _INPUT_PARAMS)
    if unsupported:
        raise InvalidRequest(
            f"input {name!r}: parameter(s) {', '.join(map(repr, unsupported))} not supported "
            "(shared memory and other extensions are not; binary_data_size is)"
        )
    size = parameters.get("binary_data_size")
    if size is None:
        return _json_elements(name, tensor.get("data"), count)
    if "data" in tensor:
        raise InvalidRequest(f"input {name!r} has both data and binary_data_size: give one")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise InvalidRequest(
            f"input {name!r}: binary_data_size must be a number of bytes, got {size!r}"
        )
    elements = decode_bytes_tensor(binary.take(name, size), name, most=count)
    if len(elements) != count:
        raise InvalidRequest(
            f"input {name!r} has {'more than ' * (len(elements) > count)}"
            f"{min(len(elements), count)} elements in its binary data but its shape says {count}"
        )
    return list(elements)


def _rows(name: str, shape: object, max_rows: int) -> int:
    if (
        not isinstance(shape, list)
        or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
        or len(shape) not in (1, 2)
        or (len(shape) == 2 and shape[1] != 1)
    ):
        raise InvalidRequest(f"input {name!r}: shape must be [N] or [N, 1], got {shape!r}")
    count = int(shape[0])
    if count < 1:
        raise InvalidRequest(f"input {name!r}: shape {shape} has no rows")
    if count > max_rows:
        raise InvalidRequest(f"input {name!r} has {count} rows; at most {max_rows} per request")
    return count


def _json_elements(name: str, data: object, count: int) -> list[Element]:
    if not isinstance(data, list):
        raise InvalidRequest(
            f"input {name!r} has no data: give 'data' (an array of strings) or "
            f"parameters.binary_data_size, got {json_type(data)}"
        )
    # Row-major data may come flat or nested by the shape: [N, 1] as [[a], [b]].
    flat = [e[0] if isinstance(e, list) and len(e) == 1 else e for e in data]
    if len(flat) != count:
        raise InvalidRequest(
            f"input {name!r} has {len(flat)} elements in data but its shape says {count}"
        )
    for i, element in enumerate(flat):
        if not isinstance(element, str):
            raise RowError(i, f"input {name!r}: element must be a string, got {json_type(element)}")
    return list(flat)


def _image(i: int, element: Element) -> str | bytes:
    if isinstance(element, bytes) and set(element) <= _PRINTABLE:
        element = element.decode("ascii")  # a URL or base64, sent in binary
    if isinstance(element, str):
        element = element.strip()
    if not element:
        raise RowError(i, "input 'image': the element is empty")
    return element


def _text(i: int, element: Element) -> str | None:
    if isinstance(element, bytes):
        try:
            element = element.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RowError(i, f"input 'text': not UTF-8 text ({exc.reason})") from None
    if len(element) > MAX_TEXT_CHARS:
        raise RowError(i, f"input 'text' has {len(element)} characters; at most {MAX_TEXT_CHARS}")
    return element.strip() or None


def _outputs(raw: object) -> tuple[OutputRequest, ...] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise InvalidRequest(f"outputs must be an array, got {json_type(raw)}")
    outputs: list[OutputRequest] = []
    for k, output in enumerate(raw):
        if not isinstance(output, Mapping) or output.get("name") not in _OUTPUTS:
            got = output.get("name") if isinstance(output, Mapping) else json_type(output)
            raise InvalidRequest(
                f"outputs[{k}]: unknown output {got!r}; outputs: {_names(_OUTPUTS)}"
            )
        name = output["name"]
        if any(o.name == name for o in outputs):
            raise InvalidRequest(f"output {name!r} is asked for twice")
        parameters = output.get("parameters") or {}
        if not isinstance(parameters, Mapping) or set(parameters) - {"binary_data"}:
            raise InvalidRequest(
                f"output {name!r}: parameters may hold only binary_data (true or false), got "
                f"{json.dumps(parameters)}"
            )
        binary = parameters.get("binary_data")
        if binary is not None and not isinstance(binary, bool):
            raise InvalidRequest(
                f"output {name!r}: binary_data must be true or false, got {binary!r}"
            )
        outputs.append(OutputRequest(name, binary))
    return tuple(outputs)


def _names(names: Sequence[str]) -> str:
    return ", ".join(map(repr, names))


def encode_infer_response(
    request: InferRequest, predictions: Sequence[Prediction], *, model_name: str, matching: bool
) -> EncodedResponse:
    """The response for ``predictions`` (one per row, in order): the outputs the request
    asked for (every one the model gives when it named none), JSON or binary as asked."""
    wanted = request.outputs
    if wanted is None:
        given = [TEXT, SCORE] if matching else [TEXT]
        if not matching and any(p.texts is not None for p in predictions):
            given.append(TEXTS)
        wanted = tuple(OutputRequest(name) for name in given)
    outputs: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for output in wanted:
        datatype, shape, values = _output(output.name, predictions)
        tensor = _tensor(output.name, datatype, shape)
        if output.binary if output.binary is not None else request.binary_output:
            chunk = encode_tensor(datatype, values)
            tensor["parameters"] = {"binary_data_size": len(chunk)}
            chunks.append(chunk)
        else:
            tensor["data"] = values
        outputs.append(tensor)
    answer: dict[str, Any] = {"model_name": model_name, "model_version": MODEL_VERSION}
    if request.id is not None:
        answer["id"] = request.id
    answer["outputs"] = outputs
    header = json.dumps(answer, ensure_ascii=False, separators=(",", ":")).encode()
    if not chunks:
        return EncodedResponse(header)
    return EncodedResponse(header + b"".join(chunks), header_length=len(header))


def _output(name: str, predictions: Sequence[Prediction]) -> tuple[str, list[int], list[Any]]:
    n = len(predictions)
    if name == SCORE:
        scores = [p.score for p in predictions]
        if None in scores:
            raise InferenceError("the model gave no score for a row")
        return FP32, [n], scores
    if name == TEXT:
        return BYTES, [n], [p.text for p in predictions]
    rows = [list(p.texts) if p.texts is not None else [p.text] for p in predictions]
    if len({len(row) for row in rows}) > 1:
        raise InferenceError("the rows gave different numbers of texts: cannot make a tensor")
    return BYTES, [n, len(rows[0]) if rows else 0], [text for row in rows for text in row]
