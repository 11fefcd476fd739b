"""Generation parameters: validated per request, hashable so rows can be grouped by them."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from blipserve.errors import InvalidRequest


class GenerationParams(BaseModel):
    """Generation settings a request may override; ``None`` means "the model's default".

    Defaults come from the model's ``generation_config``; only fields set here are passed to
    ``generate``. Instances are frozen and hashable: the engine batches together only rows
    whose parameters are equal.

    >>> GenerationParams.parse({"max_new_tokens": 30, "num_beams": 3}).generate_kwargs()
    {'max_new_tokens': 30, 'num_beams': 3}
    """

    model_config = ConfigDict(frozen=True, extra="forbid", strict=False)

    max_new_tokens: int | None = Field(None, ge=1, le=512)
    min_new_tokens: int | None = Field(None, ge=0, le=512)
    num_beams: int | None = Field(None, ge=1, le=16)
    do_sample: bool | None = None
    temperature: float | None = Field(None, gt=0.0, le=5.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, le=1000)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    length_penalty: float | None = Field(None, ge=-10.0, le=10.0)
    #: no n-gram of this size occurs twice in a generated text (0: no such guard)
    no_repeat_ngram_size: int | None = Field(None, ge=0, le=10)
    #: texts per row: the best beams (at most ``num_beams``), or independent samples
    num_return_sequences: int | None = Field(None, ge=1, le=16)

    @model_validator(mode="after")
    def _consistent(self) -> GenerationParams:
        low, high = self.min_new_tokens, self.max_new_tokens
        if low is not None and high is not None and low > high:
            raise ValueError(f"min_new_tokens ({low}) must not exceed max_new_tokens ({high})")
        # Checked here where the request says enough; with the model's defaults, by the
        # adapter (``check_params``).  Transformers refuses both in ``generate``.
        n, beams = self.num_return_sequences or 1, self.num_beams
        if n > 1 and beams is not None and beams > 1 and n > beams:
            raise ValueError(
                f"num_return_sequences ({n}) must not exceed num_beams ({beams}): beam search "
                "returns at most num_beams texts"
            )
        if n > 1 and beams == 1 and self.do_sample is False:
            raise ValueError(
                f"num_return_sequences ({n}) needs beam search (num_beams of at least {n}) or "
                "sampling (do_sample): greedy decoding has one answer"
            )
        return self

    @classmethod
    def allowed(cls) -> list[str]:
        return list(cls.model_fields)

    @classmethod
    def parse(cls, raw: object, *, where: str = "params") -> GenerationParams:
        """Validate a ``params`` object; raise :class:`InvalidRequest` naming the bad key."""
        if raw is None:
            return cls()
        if not isinstance(raw, Mapping):
            raise InvalidRequest(f"{where} must be a JSON object, got {json_type(raw)}")
        unknown = sorted(str(k) for k in raw if k not in cls.model_fields)
        if unknown:
            raise InvalidRequest(
                f"{where}: unknown parameter(s) {', '.join(map(repr, unknown))}; "
                f"allowed: {', '.join(cls.allowed())}"
            )
        for key, value in raw.items():
            # JSON true/false must not pass as 1/0 for numeric settings, nor "3" as 3.
            expected_bool = key == "do_sample"
            if value is not None and (
                isinstance(value, bool) != expected_bool or isinstance(value, str)
            ):
                want = "true or false" if expected_bool else "a number"
                raise InvalidRequest(f"{where}.{key} must be {want}, got {value!r}")
        try:
            return cls(**{str(k): v for k, v in raw.items()})
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(p) for p in first["loc"])
            name = f"{where}.{loc}" if loc else where
            # (a check across fields says itself which fields; pydantic prefixes its text)
            message = str(first["msg"]).removeprefix("Value error, ")
            raise InvalidRequest(f"{name}: {message}") from None

    def generate_kwargs(self) -> dict[str, Any]:
        """Only the explicitly set values, ready for ``model.generate(**kwargs)``."""
        return self.model_dump(exclude_none=True)

    def merged(self, override: GenerationParams) -> GenerationParams:
        """These params with ``override``'s set fields on top."""
        return GenerationParams.parse({**self.generate_kwargs(), **override.generate_kwargs()})


def json_type(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if value is None:
        return "null"
    return type(value).__name__


def load_json_object(body: object, what: str) -> Mapping[str, Any]:
    """A request body (raw JSON text or bytes, or an already decoded value) as a JSON object.

    ``what`` completes the message for anything else: ``request body must be a JSON object
    {what}, got ...``, e.g. ``with an 'input_data' key``.
    """
    if isinstance(body, (bytes, bytearray, str)):
        try:
            body = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, Mapping):
        raise InvalidRequest(f"request body must be a JSON object {what}, got {json_type(body)}")
    return body
