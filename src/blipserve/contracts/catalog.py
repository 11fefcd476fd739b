"""The Azure ML catalog scoring contract for BLIP models, with no HTTP in it.

Request::

    {"input_data": {"columns": ["image", "text"], "index": [0, 1],
                    "data": [["<url or base64>", "a question"], ...]},
     "params": {"max_new_tokens": 30}}

(pandas ``to_json(orient="split")`` layout; ``index`` optional; ``text`` optional; other
columns are ignored as the catalog does) or ``input_data`` as a list of records
``[{"image": ..., "text": ...}]``.  Response: ``[{"text": "..."}, ...]`` in row order, with
``"score"`` added for image-text matching.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from blipserve.errors import InvalidRequest, RowError
from blipserve.params import GenerationParams, json_type, load_json_object
from blipserve.types import Prediction, RowInput

IMAGE = "image"
TEXT = "text"
MAX_TEXT_CHARS = 2000


@dataclass(frozen=True)
class ScoringRequest:
    rows: list[RowInput]
    params: GenerationParams


def encode_response(predictions: Sequence[Prediction]) -> list[dict[str, Any]]:
    """The catalog's answer: ``[{"text": ...}, ...]`` in row order."""
    return [p.to_json() for p in predictions]


def parse_request(body: object, *, max_rows: int = 1024) -> ScoringRequest:
    """Validate a scoring request (raw JSON text/bytes or an already decoded object).

    Raises :class:`InvalidRequest` for a malformed body and :class:`RowError` naming the
    row for a malformed row.
    """
    body = load_json_object(body, "with an 'input_data' key")
    if "input_data" not in body:
        keys = ", ".join(map(repr, body)) or "none"
        raise InvalidRequest(f"request body has no 'input_data' key (keys found: {keys})")
    params = GenerationParams.parse(_params(body))
    input_data = body["input_data"]
    if isinstance(input_data, Mapping):
        rows = _parse_split(input_data)
    elif isinstance(input_data, list):
        rows = _parse_records(input_data)
    else:
        raise InvalidRequest(
            "input_data must be an object in pandas 'split' layout "
            '({"columns": [...], "data": [[...]]}) or a list of records, '
            f"got {json_type(input_data)}"
        )
    if not rows:
        raise InvalidRequest("input_data has no rows")
    if len(rows) > max_rows:
        raise InvalidRequest(f"input_data has {len(rows)} rows; at most {max_rows} per request")
    return ScoringRequest(rows=rows, params=params)


# Where clients put generation settings: "params" (the catalog's image-to-text samples),
# or "parameters" beside or inside "input_data" (its text-generation samples). One only.
_PARAM_PLACES = (("params",), ("parameters",), ("input_data", "parameters"))


def _params(body: Mapping[str, Any]) -> object:
    found: list[tuple[str, object]] = []
    for path in _PARAM_PLACES:
        node: object = body
        for key in path:
            node = node.get(key) if isinstance(node, Mapping) else None
        if node is not None:
            found.append((".".join(path), node))
    if len(found) > 1:
        names = " and ".join(repr(name) for name, _ in found)
        raise InvalidRequest(f"generation settings given twice, in {names}: keep one")
    return found[0][1] if found else None


def _parse_split(input_data: Mapping[str, Any]) -> list[RowInput]:
    columns = input_data.get("columns")
    data = input_data.get("data")
    if not isinstance(columns, list) or not all(isinstance(c, str) for c in columns):
        raise InvalidRequest('input_data.columns must be a list of column names, e.g. ["image"]')
    if len(set(columns)) != len(columns):
        raise InvalidRequest(f"input_data.columns has duplicate names: {columns}")
    if IMAGE not in columns:
        raise InvalidRequest(
            f"input_data.columns must include 'image' (and optionally 'text'), got {columns}"
        )
    if not isinstance(data, list):
        raise InvalidRequest(f"input_data.data must be a list of rows, got {json_type(data)}")
    index = input_data.get("index")
    if index is not None:
        if not isinstance(index, list):
            raise InvalidRequest(f"input_data.index must be a list, got {json_type(index)}")
        if len(index) != len(data):
            raise InvalidRequest(
                f"input_data.index has {len(index)} entries but data has {len(data)} rows"
            )
    image_col = columns.index(IMAGE)
    text_col = columns.index(TEXT) if TEXT in columns else None
    rows = []
    for i, values in enumerate(data):
        label = index[i] if index is not None else None
        if not isinstance(values, list):
            raise RowError(
                i, f"must be a list of {len(columns)} values, got {json_type(values)}", label
            )
        if len(values) != len(columns):
            raise RowError(
                i, f"has {len(values)} values but columns has {len(columns)} ({columns})", label
            )
        text = values[text_col] if text_col is not None else None
        rows.append(_make_row(i, values[image_col], text, label))
    return rows


def _parse_records(records: list[Any]) -> list[RowInput]:
    rows = []
    for i, record in enumerate(records):
        if not isinstance(record, Mapping):
            raise RowError(i, f"must be an object with an 'image' key, got {json_type(record)}")
        if IMAGE not in record:
            raise RowError(i, f"has no 'image' key (keys found: {', '.join(map(repr, record))})")
        rows.append(_make_row(i, record[IMAGE], record.get(TEXT), None))
    return rows


def _make_row(i: int, image: object, text: object, label: object | None) -> RowInput:
    if not isinstance(image, str) or not image.strip():
        what = "an empty string" if isinstance(image, str) else json_type(image)
        raise RowError(i, f"'image' must be an http(s) URL or base64 text, got {what}", label)
    if text is not None and not isinstance(text, str):
        raise RowError(i, f"'text' must be a string or null, got {json_type(text)}", label)
    if text is not None:
        if len(text) > MAX_TEXT_CHARS:
            raise RowError(i, f"'text' has {len(text)} characters; at most {MAX_TEXT_CHARS}", label)
        text = text.strip() or None
    return RowInput(position=i, image=image.strip(), text=text, index=label)
