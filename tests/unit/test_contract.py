"""The catalog scoring contract: every accepted shape and every error, by row."""

from __future__ import annotations

import json
from typing import Any

import pytest

from blipserve.contracts.catalog import encode_response, parse_request
from blipserve.errors import InvalidRequest, RowError
from blipserve.params import GenerationParams
from blipserve.types import Prediction, RowInput
from helpers import b64_png

IMG = b64_png(0)


def split(columns: list[str], data: Any, **extra: Any) -> dict[str, Any]:
    return {"input_data": {"columns": columns, "data": data, **extra}}


def test_split_image_only() -> None:
    req = parse_request(split(["image"], [[IMG], ["https://example.com/a.jpg"]]))
    assert [r.image for r in req.rows] == [IMG, "https://example.com/a.jpg"]
    assert [r.text for r in req.rows] == [None, None]
    assert [r.position for r in req.rows] == [0, 1]
    assert req.params == GenerationParams()


def test_split_image_text_with_index_and_extra_columns_ignored() -> None:
    body = split(
        ["id", "text", "image"], [[7, "what is it?", IMG], [8, "  ", IMG]], index=["a", "b"]
    )
    rows = parse_request(body).rows
    assert rows[0] == RowInput(position=0, image=IMG, text="what is it?", index="a")
    assert rows[1].text is None  # blank text means no text
    assert rows[1].index == "b"


def test_records_layout_and_json_text_bytes() -> None:
    body = {"input_data": [{"image": IMG, "text": "q"}, {"image": IMG}]}
    for raw in (body, json.dumps(body), json.dumps(body).encode()):
        rows = parse_request(raw).rows
        assert [(r.image, r.text) for r in rows] == [(IMG, "q"), (IMG, None)]


def test_params_are_validated_and_kept() -> None:
    req = parse_request(
        {**split(["image"], [[IMG]]), "params": {"max_new_tokens": 7, "num_beams": 2}}
    )
    assert req.params.generate_kwargs() == {"max_new_tokens": 7, "num_beams": 2}


def test_response_shape() -> None:
    assert encode_response([Prediction("a cat"), Prediction("0.9000", score=0.9)]) == [
        {"text": "a cat"},
        {"text": "0.9000", "score": 0.9},
    ]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        ([1, 2], "must be a JSON object with an 'input_data' key, got an array"),
        ({"data": []}, "no 'input_data' key (keys found: 'data')"),
        ({"input_data": "x"}, "got a string"),
        ({"input_data": {"data": [[IMG]]}}, "columns must be a list"),
        (split(["text"], [["x"]]), "must include 'image'"),
        (split(["image", "image"], [[IMG, IMG]]), "duplicate"),
        (split(["image"], {"0": IMG}), "data must be a list of rows, got dict"),
        (split(["image"], []), "no rows"),
        (split(["image"], [[IMG]], index=[0, 1]), "index has 2 entries but data has 1"),
        (
            {**split(["image"], [[IMG]]), "params": {"beams": 3}},
            "unknown parameter(s) 'beams'; allowed: max_new_tokens",
        ),
        (
            {**split(["image"], [[IMG]]), "params": {"max_new_tokens": 0}},
            "params.max_new_tokens: Input should be greater than or equal to 1",
        ),
        ({**split(["image"], [[IMG]]), "params": {"num_beams": 1000}}, "params.num_beams"),
        ({**split(["image"], [[IMG]]), "params": {"top_p": 1.5}}, "params.top_p"),
        ({**split(["image"], [[IMG]]), "params": {"do_sample": 1}}, "true or false"),
        ({**split(["image"], [[IMG]]), "params": {"max_new_tokens": "5"}}, "must be a number"),
        ({**split(["image"], [[IMG]]), "params": {"max_new_tokens": True}}, "must be a number"),
        (
            {**split(["image"], [[IMG]]), "params": {"min_new_tokens": 9, "max_new_tokens": 3}},
            "params: min_new_tokens (9) must not exceed max_new_tokens (3)",
        ),
        ({**split(["image"], [[IMG]]), "params": [1]}, "params must be a JSON object"),
    ],
)
def test_request_errors(body: object, message: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_request(body)
    assert message in info.value.message


def test_too_many_rows() -> None:
    with pytest.raises(InvalidRequest, match="3 rows; at most 2"):
        parse_request(split(["image"], [[IMG]] * 3), max_rows=2)


@pytest.mark.parametrize(
    ("body", "row", "message"),
    [
        (split(["image", "text"], [[IMG, "q"], [IMG]]), 1, "has 1 values but columns has 2"),
        (split(["image"], [[IMG], IMG]), 1, "must be a list of 1 values, got a string"),
        (
            split(["image"], [[IMG], [None]]),
            1,
            "'image' must be an http(s) URL or base64 text, got null",
        ),
        (split(["image"], [[""]]), 0, "got an empty string"),
        (split(["image"], [[3]]), 0, "got a number"),
        (split(["image", "text"], [[IMG, 5]]), 0, "'text' must be a string or null, got a number"),
        (split(["image", "text"], [[IMG, "x" * 5000]]), 0, "5000 characters"),
        (
            {"input_data": [{"image": IMG}, {"img": IMG}]},
            1,
            "has no 'image' key (keys found: 'img')",
        ),
        ({"input_data": [{"image": IMG}, "x"]}, 1, "must be an object"),
    ],
)
def test_row_errors_name_the_row(body: object, row: int, message: str) -> None:
    with pytest.raises(RowError) as info:
        parse_request(body)
    assert info.value.row == row
    assert info.value.message.startswith(f"row {row}")
    assert message in info.value.message


def test_row_error_names_the_index_label() -> None:
    with pytest.raises(RowError, match=r"^row 1 \(index 'b'\): 'image'"):
        parse_request(split(["image"], [[IMG], [7]], index=["a", "b"]))


@pytest.mark.parametrize(
    "body",
    [
        {"input_data": {"columns": ["image"], "data": [["x"]]}, "params": {"max_new_tokens": 7}},
        {
            "input_data": {"columns": ["image"], "data": [["x"]]},
            "parameters": {"max_new_tokens": 7},
        },
        {
            "input_data": {
                "columns": ["image"],
                "data": [["x"]],
                "parameters": {"max_new_tokens": 7},
            }
        },
    ],
    ids=["params", "parameters", "input_data.parameters"],
)
def test_generation_settings_in_each_place_clients_put_them(body: dict[str, object]) -> None:
    assert parse_request(body).params.max_new_tokens == 7


def test_generation_settings_given_twice_are_refused() -> None:
    body = {
        "input_data": {"columns": ["image"], "data": [["x"]]},
        "params": {"max_new_tokens": 7},
        "parameters": {"max_new_tokens": 9},
    }
    with pytest.raises(InvalidRequest, match="'params' and 'parameters'"):
        parse_request(body)
