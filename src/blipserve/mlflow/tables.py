"""What the pyfunc model reads and writes, without MLflow: the settings it keeps in its
``model_config``, the DataFrame rows it is given and the DataFrame it answers with.

MLflow hands ``predict`` a pandas DataFrame whose ``image`` column holds base64 text (as
``base64.encodebytes`` writes it, line breaks included, or a data URL), http(s) URLs or the
bytes of an image file, and whose optional ``text`` column holds each row's text.  These
become the :class:`~blipserve.types.RowInput` rows every other entry point makes, so the
engine decodes, checks and batches them as it does a ``/score`` request's.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, Final

from blipserve.config import PARTS, Settings
from blipserve.config.fields import base_type, convert, fields_with_types
from blipserve.contracts.catalog import IMAGE, MAX_TEXT_CHARS, TEXT
from blipserve.errors import InvalidInput, RowError
from blipserve.params import GenerationParams, json_type
from blipserve.types import Prediction, RowInput

#: the settings parts a saved model keeps: what loading the model and running it need
SAVED_PARTS: Final = ("model", "engine", "images", "fetch")
#: model_config keys that are not settings: the model's name or path when it was exported
SOURCE_KEY: Final = "source"
#: fields that make no sense once the model's files are in the MLflow model
_NOT_SAVED: Final = frozenset({"model", "revision"})


def _saved_fields() -> dict[str, tuple[str, dataclasses.Field[Any], Any]]:
    """model_config key -> (part, field, type hint); keys are the fields' own names."""
    out: dict[str, tuple[str, dataclasses.Field[Any], Any]] = {}
    for part in SAVED_PARTS:
        for f, hint in fields_with_types(PARTS[part]):
            if f.name in _NOT_SAVED:
                continue
            if f.name in out:  # (a flat key must name one field; a new field must not clash)
                raise TypeError(f"settings field {f.name!r} is in two parts: {out[f.name][0]}")
            out[f.name] = (part, f, hint)
    return out


def settings_to_config(settings: Settings, source: str) -> dict[str, Any]:
    """The settings as a flat, JSON-ready ``model_config``: ``{"dtype": "auto", ...}``."""
    config: dict[str, Any] = {SOURCE_KEY: source}
    for name, (part, _, _) in _saved_fields().items():
        value = getattr(getattr(settings, part), name)
        config[name] = list(value) if isinstance(value, tuple) else value
    return config


def settings_from_config(config: Mapping[str, Any], model_dir: str) -> Settings:
    """Settings from a ``model_config`` (as saved, or with MLflow's overrides applied:
    ``load_model(..., model_config=...)`` or ``MLFLOW_PYFUNC_INFERENCE_CONFIG``), with the
    model loaded from ``model_dir``.  Each value is checked as its flag's text would be;
    :class:`InvalidInput` names the key that is wrong."""
    fields = _saved_fields()
    unknown = sorted(set(config) - set(fields) - {SOURCE_KEY})
    if unknown:
        raise InvalidInput(
            f"model_config: unknown setting(s) {', '.join(map(repr, unknown))}; "
            f"known: {', '.join(fields)}"
        )
    overrides: dict[str, dict[str, Any]] = {part: {} for part in SAVED_PARTS}
    for name, value in config.items():
        if name == SOURCE_KEY or value is None:
            continue
        part, f, hint = fields[name]
        try:
            overrides[part][name] = convert(f, hint, _as_text(value, hint))
        except ValueError as exc:
            raise InvalidInput(f"model_config {name!r}: {exc}") from None
    overrides["model"]["model"] = model_dir
    # Only what the model_config says: the environment was read when the model was saved.
    return Settings.build({}, parts=SAVED_PARTS, **overrides)


def _as_text(value: Any, hint: Any) -> str:
    """A model_config value as its flag's text, so the flag's own checks apply."""
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    if isinstance(value, bool) and base_type(hint) is not bool:
        raise ValueError(f"expected {base_type(hint).__name__}, got {value!r}")
    return str(value)


def rows_from_frame(frame: Any) -> list[RowInput]:
    """A DataFrame's rows as blipserve rows, in order; a bad cell raises :class:`RowError`
    naming its row (and its index label, when the frame has one of its own)."""
    if IMAGE not in frame.columns:
        raise InvalidInput(f"the input needs an {IMAGE!r} column; got {list(frame.columns)}")
    images = frame[IMAGE].tolist()
    texts = frame[TEXT].tolist() if TEXT in frame.columns else [None] * len(images)
    labels = _labels(frame)
    return [
        _row(i, image, text, labels[i])
        for i, (image, text) in enumerate(zip(images, texts, strict=True))
    ]


def _labels(frame: Any) -> list[object | None]:
    """Each row's index label, or None where the frame has the default 0, 1, 2, ..."""
    index = frame.index.tolist()
    if index == list(range(len(index))):
        return [None] * len(index)
    return [v.item() if hasattr(v, "item") else v for v in index]  # numpy -> Python


def _row(i: int, image: object, text: object, label: object | None) -> RowInput:
    if isinstance(image, (bytes, bytearray, memoryview)):
        if not image:
            raise RowError(i, f"{IMAGE!r} is empty", label)
        cell: str | bytes = bytes(image)
    elif isinstance(image, str) and image.strip():
        cell = image.strip()
    else:
        what = "an empty string" if isinstance(image, str) else _cell_type(image)
        raise RowError(
            i, f"{IMAGE!r} must be base64 text, an http(s) URL or image bytes, got {what}", label
        )
    if _missing(text):
        return RowInput(i, cell, None, label)
    if not isinstance(text, str):
        raise RowError(i, f"{TEXT!r} must be a string or null, got {_cell_type(text)}", label)
    if len(text) > MAX_TEXT_CHARS:
        raise RowError(i, f"{TEXT!r} has {len(text)} characters; at most {MAX_TEXT_CHARS}", label)
    return RowInput(i, cell, text.strip() or None, label)


def _missing(value: object) -> bool:
    """None, or pandas' NaN / NA for an empty cell."""
    if value is None or type(value).__name__ in ("NAType", "NaTType"):
        return True
    return isinstance(value, numbers.Real) and math.isnan(value)


def _cell_type(value: object) -> str:
    return "a missing value" if _missing(value) else json_type(value)


def frame_columns(text_role: str, params: GenerationParams) -> list[str]:
    """The answer's columns: ``text``; ``score`` for matching; ``texts`` (every text, best
    first) when a row asks for several."""
    columns = [TEXT]
    if text_role == "match":
        columns.append("score")
    if (params.num_return_sequences or 1) > 1:
        columns.append("texts")
    return columns


def frame_records(
    predictions: Sequence[Prediction], columns: Sequence[str]
) -> dict[str, list[Any]]:
    """The predictions as the answer's columns (``pandas.DataFrame(...)`` of this)."""
    values: dict[str, list[Any]] = {name: [] for name in columns}
    for p in predictions:
        cells = {"text": p.text, "score": p.score, "texts": list(p.texts or (p.text,))}
        for name in columns:
            values[name].append(cells[name])
    return values


def params_from_request(params: Mapping[str, Any] | None) -> GenerationParams:
    """The request's ``params`` as blipserve checks them: MLflow fills every parameter of
    the signature (None: the model's own default), blipserve takes the ones set."""
    raw = {k: v for k, v in (params or {}).items() if v is not None}
    return GenerationParams.parse(raw, where="params")
