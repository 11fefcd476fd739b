"""The Open Inference Protocol's wire format (blipserve.contracts.open_inference), no HTTP:
JSON and binary request bodies -> rows and parameters, predictions -> outputs, and an error
naming the tensor (and the row) for every malformed part.

Binary bodies are made, and binary responses read, by the real ``tritonclient.http``
(``generate_request_body``, ``parse_response_body``), so the framing is the client's, not
a copy of ours.
"""

from __future__ import annotations

import json
import re
import struct
from typing import Any

import numpy as np
import pytest
import tritonclient.http as triton

from blipserve.contracts.open_inference import (
    InferRequest,
    OutputRequest,
    check_model,
    encode_infer_response,
    model_metadata,
    parse_infer_request,
)
from blipserve.contracts.open_inference_binary import (
    decode_bytes_tensor,
    encode_bytes_tensor,
    parse_header_length,
)
from blipserve.errors import InferenceError, InvalidRequest, ModelNotFound, RowError
from blipserve.params import GenerationParams
from blipserve.types import Prediction, RowInput
from helpers import b64_png, make_image, png_bytes

PNG = png_bytes(make_image(0))


def tensor(name: str, data: list[Any], shape: list[int] | None = None) -> dict[str, Any]:
    return {"name": name, "datatype": "BYTES", "shape": shape or [len(data)], "data": data}


def body(*inputs: object, **fields: Any) -> bytes:
    return json.dumps({"inputs": list(inputs), **fields}).encode()


def triton_body(
    images: list[bytes], texts: list[str] | None = None, *, binary_texts: bool = True
) -> tuple[bytes, int | None]:
    """A request body as ``tritonclient.http`` frames it (images always binary)."""
    image = triton.InferInput("image", [len(images)], "BYTES")
    image.set_data_from_numpy(np.array(images, dtype=np.object_), binary_data=True)
    inputs = [image]
    if texts is not None:
        text = triton.InferInput("text", [len(texts), 1], "BYTES")
        column = np.array([[t.encode()] for t in texts], dtype=np.object_)
        text.set_data_from_numpy(column, binary_data=binary_texts)
        inputs.append(text)
    framed, header_length = triton.InferenceServerClient.generate_request_body(
        inputs, parameters={"max_new_tokens": 5}
    )
    return framed, header_length


# -- requests as JSON ---------------------------------------------------------------------


def test_json_rows_texts_and_parameters() -> None:
    image = b64_png(0)
    parsed = parse_infer_request(
        body(
            tensor("image", [image, "https://example.com/a.jpg"]),
            tensor("text", ["  a picture of ", ""]),
            id="req-7",
            parameters={"max_new_tokens": 5, "num_beams": 2, "timeout": 250_000},
        )
    )
    assert parsed.rows == [
        RowInput(0, image, "a picture of"),
        RowInput(1, "https://example.com/a.jpg", None),
    ]
    assert parsed.params == GenerationParams(max_new_tokens=5, num_beams=2)
    assert (parsed.id, parsed.timeout_s, parsed.outputs, parsed.binary_output) == (
        "req-7",
        0.25,
        None,
        False,
    )


@pytest.mark.parametrize("data", [["a", "b"], [["a"], ["b"]]], ids=["flat", "nested"])
def test_shape_n_by_1_takes_flat_or_nested_data(data: list[Any]) -> None:
    parsed = parse_infer_request(body(tensor("image", data, [2, 1])))
    assert [row.image for row in parsed.rows] == ["a", "b"]


def test_outputs_asked_for_and_binary_data_output() -> None:
    parsed = parse_infer_request(
        body(
            tensor("image", ["a"]),
            outputs=[{"name": "score"}, {"name": "text", "parameters": {"binary_data": False}}],
            parameters={"binary_data_output": True},
        )
    )
    assert parsed.outputs == (OutputRequest("score"), OutputRequest("text", binary=False))
    assert parsed.binary_output
    with pytest.raises(InvalidRequest, match="this model gives 'text', 'texts', not 'score'"):
        parsed.check_outputs(("text", "texts"))


# -- requests with binary tensors ------------------------------------------------------------


def test_binary_images_and_texts_from_tritonclient() -> None:
    framed, header_length = triton_body([PNG, b64_png(1).encode()], ["a picture of", "é"])
    assert header_length is not None
    parsed = parse_infer_request(framed, header_length)
    # raw image bytes stay bytes; printable ASCII (a URL or base64 sent in binary) is text
    assert parsed.rows == [RowInput(0, PNG, "a picture of"), RowInput(1, b64_png(1), "é")]
    assert parsed.params == GenerationParams(max_new_tokens=5)


def test_binary_images_beside_json_texts() -> None:
    framed, header_length = triton_body([PNG], ["what colour?"], binary_texts=False)
    parsed = parse_infer_request(framed, header_length)
    assert parsed.rows == [RowInput(0, PNG, "what colour?")]


def test_bytes_tensor_round_trip() -> None:
    elements = [b"", b"abc", PNG]
    assert decode_bytes_tensor(encode_bytes_tensor(elements)) == elements
    assert encode_bytes_tensor([b"ab"]) == b"\x02\x00\x00\x00ab"


# -- malformed requests ---------------------------------------------------------------------


def binary_image(size: int, shape: list[int] | None = None) -> dict[str, Any]:
    parameters = {"binary_data_size": size}
    return {"name": "image", "datatype": "BYTES", "shape": shape or [1], "parameters": parameters}


IMAGE = tensor("image", ["a", "b"])
BAD_JSON: list[tuple[bytes, str]] = [
    (b"{", "request body is not valid JSON"),
    (b"[]", "request body must be a JSON object with an 'inputs' key, got an array"),
    (body(), "inputs must be a non-empty array of tensors, got an empty array"),
    (json.dumps({"inputs": "x"}).encode(), "inputs must be a non-empty array of tensors, got a"),
    (body("image"), "inputs[0] must be an object, got a string"),
    (body({"datatype": "BYTES"}), "inputs[0] has no 'name'"),
    (body(tensor("pixels", ["a"])), "inputs[0]: unknown input 'pixels'; this model takes"),
    (body(IMAGE, IMAGE), "input 'image' is given twice"),
    (body({**IMAGE, "datatype": "FP32"}), "input 'image': datatype must be 'BYTES', got 'FP32'"),
    (body({**IMAGE, "shape": [2, 3]}), "input 'image': shape must be [N] or [N, 1], got [2, 3]"),
    (body({**IMAGE, "shape": "2"}), "input 'image': shape must be [N] or [N, 1], got '2'"),
    (body({**IMAGE, "shape": [True]}), "input 'image': shape must be [N] or [N, 1]"),
    (body({**IMAGE, "shape": [0], "data": []}), "input 'image': shape [0] has no rows"),
    (body({**IMAGE, "shape": [9]}), "input 'image' has 9 rows; at most 8 per request"),
    (body({**IMAGE, "shape": [3]}), "input 'image' has 2 elements in data but its shape says 3"),
    (body({**IMAGE, "data": None}), "input 'image' has no data: give 'data'"),
    (body(tensor("text", ["q"])), "the request has no 'image' input (inputs found: 'text')"),
    (body(IMAGE, tensor("text", ["q"])), "input 'text' has 1 elements but input 'image' has 2"),
    (
        body({**IMAGE, "parameters": {"shared_memory_region": "r"}}),
        "input 'image': parameter(s) 'shared_memory_region' not supported",
    ),
    (
        body(binary_image(4)),
        "input 'image' has binary_data_size but the request has no Inference-Header-Content-Length",
    ),
    (body(IMAGE, parameters={"priority": 1}), "parameters: unknown parameter(s) 'priority'"),
    (body(IMAGE, parameters=[1]), "parameters must be a JSON object, got an array"),
    (body(IMAGE, parameters={"max_new_tokens": 0}), "parameters.max_new_tokens: Input should be"),
    (body(IMAGE, parameters={"num_beams": "3"}), "parameters.num_beams must be a number"),
    (
        body(IMAGE, parameters={"binary_data_output": 1}),
        "parameters.binary_data_output must be true or false, got 1",
    ),
    (
        body(IMAGE, parameters={"timeout": 0}),
        "parameters.timeout must be microseconds (over 0), got 0",
    ),
    (
        body(IMAGE, parameters={"timeout": 1.5}),
        "parameters.timeout must be microseconds (over 0), got 1.5",
    ),
    (body(IMAGE, id=7), "id must be a string, got a number"),
    (body(IMAGE, outputs={"name": "text"}), "outputs must be an array, got dict"),
    (body(IMAGE, outputs=[{"name": "caption"}]), "outputs[0]: unknown output 'caption'"),
    (body(IMAGE, outputs=[{"name": "text"}] * 2), "output 'text' is asked for twice"),
    (
        body(IMAGE, outputs=[{"name": "text", "parameters": {"classification": 3}}]),
        "output 'text': parameters may hold only binary_data",
    ),
]


@pytest.mark.parametrize(("raw", "message"), BAD_JSON, ids=[m for _, m in BAD_JSON])
def test_malformed_requests_are_named(raw: bytes, message: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_infer_request(raw, max_rows=8)
    assert not isinstance(caught.value, RowError)
    assert message in caught.value.message


BAD_ROWS: list[tuple[bytes, int, str]] = [
    (body(tensor("image", ["a", 5])), 1, "row 1: input 'image': element must be a string, got a"),
    (body(tensor("image", ["a", " "])), 1, "row 1: input 'image': the element is empty"),
    (
        body(tensor("image", ["a"]), tensor("text", [None])),
        0,
        "row 0: input 'text': element must be a string, got null",
    ),
    (
        body(tensor("image", ["a", "b"]), tensor("text", ["q", "x" * 2001])),
        1,
        "row 1: input 'text' has 2001 characters; at most 2000",
    ),
]


@pytest.mark.parametrize(("raw", "row", "message"), BAD_ROWS, ids=[m for _, _, m in BAD_ROWS])
def test_a_bad_element_names_its_row(raw: bytes, row: int, message: str) -> None:
    with pytest.raises(RowError) as caught:
        parse_infer_request(raw)
    assert caught.value.row == row
    assert caught.value.message.startswith(message)


def framed(header: dict[str, Any], binary: bytes) -> tuple[bytes, int]:
    encoded = json.dumps(header).encode()
    return encoded + binary, len(encoded)


ONE = encode_bytes_tensor([PNG])
BAD_BINARY: list[tuple[dict[str, Any], bytes, str]] = [
    (
        {"inputs": [binary_image(len(ONE) + 10)]},
        ONE,
        f"input 'image': binary_data_size is {len(ONE) + 10} but only {len(ONE)} bytes",
    ),
    (
        {"inputs": [binary_image(len(ONE))]},
        ONE + b"tail",
        f"the body has {len(ONE) + 4} bytes of binary data after the JSON but the inputs' "
        f"binary_data_size add up to {len(ONE)}",
    ),
    (
        {"inputs": [binary_image(2)]},
        b"\x01\x00",
        "input 'image': binary data ends inside the length of element 0",
    ),
    (
        {"inputs": [binary_image(6)]},
        b"\x09\x00\x00\x00ab",
        "input 'image': element 0 says it has 9 bytes but only 2 are left",
    ),
    (
        {"inputs": [binary_image(len(ONE), shape=[2])]},
        ONE,
        "input 'image' has 1 elements in its binary data but its shape says 2",
    ),
    (
        {"inputs": [{**binary_image(len(ONE)), "data": ["a"]}]},
        ONE,
        "input 'image' has both data and binary_data_size",
    ),
    (
        {"inputs": [binary_image(-1)]},
        ONE,
        "input 'image': binary_data_size must be a number of bytes, got -1",
    ),
]


@pytest.mark.parametrize(
    ("header", "binary", "message"), BAD_BINARY, ids=[m for *_, m in BAD_BINARY]
)
def test_broken_binary_framing_is_named(
    header: dict[str, Any], binary: bytes, message: str
) -> None:
    raw, length = framed(header, binary)
    with pytest.raises(InvalidRequest, match="^" + re.escape(message)):
        parse_infer_request(raw, length)


def test_a_header_length_that_cuts_the_json_is_suspected() -> None:
    raw = body(tensor("image", ["a"]))
    with pytest.raises(InvalidRequest) as caught:
        parse_infer_request(raw, 20)
    assert caught.value.message.startswith("request body is not valid JSON")
    assert caught.value.message.endswith(
        f"(read as the first 20 of {len(raw)} bytes, as Inference-Header-Content-Length says: "
        "is that header meant for this request?)"
    )


def test_binary_text_must_be_utf8() -> None:
    texts = encode_bytes_tensor([b"ok", b"\xff\xfe"])
    header = {
        "inputs": [
            tensor("image", ["a", "b"]),
            {**binary_image(len(texts), shape=[2]), "name": "text"},
        ]
    }
    raw, length = framed(header, texts)
    with pytest.raises(RowError, match=r"^row 1: input 'text': not UTF-8 text"):
        parse_infer_request(raw, length)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("abc", "Inference-Header-Content-Length must be a number of bytes, got 'abc'"),
        ("-3", "must be a number of bytes"),
        ("0", "Inference-Header-Content-Length is 0 but the body has 10 bytes"),
        ("11", "Inference-Header-Content-Length is 11 but the body has 10 bytes"),
    ],
)
def test_header_length_is_checked(value: str, message: str) -> None:
    with pytest.raises(InvalidRequest, match=re.escape(message)):
        parse_header_length(value, 10)
    assert parse_header_length(None, 10) is None
    assert parse_header_length("10", 10) == 10


# -- responses ----------------------------------------------------------------------------------


def request(**fields: Any) -> InferRequest:
    rows = [RowInput(0, "a"), RowInput(1, "b")]
    return InferRequest(rows=rows, params=GenerationParams(), **fields)


CAPTIONS = [Prediction("a red circle"), Prediction("two squares")]
MATCHES = [Prediction("0.9", score=0.9), Prediction("0.1", score=0.1)]


def test_text_as_json_by_default() -> None:
    answer = encode_infer_response(request(id="r1"), CAPTIONS, model_name="demo", matching=False)
    assert answer.header_length is None
    assert json.loads(answer.body) == {
        "model_name": "demo",
        "model_version": "1",
        "id": "r1",
        "outputs": [
            {
                "name": "text",
                "datatype": "BYTES",
                "shape": [2],
                "data": ["a red circle", "two squares"],
            }
        ],
    }


def test_binary_outputs_read_by_tritonclient() -> None:
    answer = encode_infer_response(
        request(binary_output=True), MATCHES, model_name="itm", matching=True
    )
    assert answer.header_length is not None
    result = triton.InferenceServerClient.parse_response_body(
        answer.body, header_length=answer.header_length
    )
    assert result.as_numpy("text").tolist() == [b"0.9", b"0.1"]
    scores = result.as_numpy("score")
    assert scores.dtype == np.float32
    assert scores.tolist() == pytest.approx([0.9, 0.1])
    header = json.loads(answer.body[: answer.header_length])
    assert [o["parameters"]["binary_data_size"] for o in header["outputs"]] == [14, 8]
    assert answer.body[answer.header_length + 14 :] == struct.pack("<2f", 0.9, 0.1)


def test_an_output_asked_for_in_json_among_binary_ones() -> None:
    outputs = (OutputRequest("score", binary=False), OutputRequest("text"))
    answer = encode_infer_response(
        request(outputs=outputs, binary_output=True), MATCHES, model_name="itm", matching=True
    )
    assert answer.header_length is not None
    header = json.loads(answer.body[: answer.header_length])
    assert [o["name"] for o in header["outputs"]] == ["score", "text"]
    assert header["outputs"][0]["data"] == pytest.approx([0.9, 0.1])
    assert "data" not in header["outputs"][1]


def test_several_texts_a_row_are_an_n_by_k_tensor() -> None:
    several = [
        Prediction("a", texts=("a", "b", "c")),
        Prediction("d", texts=("d", "e", "f")),
    ]
    answer = encode_infer_response(request(), several, model_name="demo", matching=False)
    outputs = json.loads(answer.body)["outputs"]
    assert outputs[1] == {
        "name": "texts",
        "datatype": "BYTES",
        "shape": [2, 3],
        "data": ["a", "b", "c", "d", "e", "f"],
    }
    uneven = [Prediction("a", texts=("a", "b")), Prediction("d", texts=("d",))]
    with pytest.raises(InferenceError):
        encode_infer_response(request(), uneven, model_name="demo", matching=False)


def test_model_names_and_metadata() -> None:
    check_model("Salesforce/blip-itm-base-coco", None, "Salesforce/blip-itm-base-coco")
    check_model("blipserve", "1", "demo")
    with pytest.raises(ModelNotFound, match="no model 'other' here: this server serves 'demo'"):
        check_model("other", None, "demo")
    with pytest.raises(ModelNotFound, match="has no version '2'"):
        check_model("demo", "2", "demo")
    meta = model_metadata("itm", platform="blip-itm", matching=True)
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [
        ("image", "BYTES", [-1]),
        ("text", "BYTES", [-1]),
    ]
    assert [(t["name"], t["datatype"]) for t in meta["outputs"]] == [
        ("text", "BYTES"),
        ("score", "FP32"),
    ]


def test_a_binary_tensor_is_read_no_further_than_its_shape_allows() -> None:
    empty = b"\0\0\0\0"  # one zero-length element: 4 bytes
    assert decode_bytes_tensor(empty * 3_000_000, "image", most=2) == [b""] * 3
    assert len(decode_bytes_tensor(empty * 5, "image")) == 5
