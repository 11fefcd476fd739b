"""The catalog's batch-endpoint contract: the body that starts a job, and the job as its
clients read it.

A job is started with the body a catalog batch endpoint's ``/jobs`` takes::

    {"properties": {
       "InputData":  {"ANY_NAME": {"JobInputType": "UriFolder", "Uri": "az://data/in/"}},
       "OutputData": {"ANY_NAME": {"JobOutputType": "UriFile",
                                   "Uri": "az://data/out/predictions.csv"}},
       "blipserve": {"format": "jsonl", "params": {"max_new_tokens": 30}}}}

One input and at most one output (their names are the client's own); ``blipserve`` is
ours: a job's own batch options, each checked here.  Clients read a job's
``properties.status``; its ``name`` (equal to its ``id``, so that clients polling
``/jobs/{id}`` and ``/jobs/{name}`` both work) names it in the routes.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from blipserve.config.jobs import OutputFormat
from blipserve.errors import InvalidInput, quote
from blipserve.params import GenerationParams, json_type, load_json_object

UriType = Literal["UriFolder", "UriFile"]
URI_TYPES: tuple[str, ...] = typing.get_args(UriType)
FORMATS: tuple[str, ...] = typing.get_args(OutputFormat)
# blipserve's own per-job options in properties.blipserve: name -> what it takes
OVERRIDES: Mapping[str, str] = {
    "format": "an output format (" + ", ".join(FORMATS) + ")",
    "text_from": "txt or json:FIELD (WebDataset input: each sample's text)",
    "prompt": "text for rows without any",
    "caption_key": "a name (WebDataset output)",
    "retry_errors": "true or false (run again the rows that failed last time)",
    "params": "generation parameters, as /score takes them",
}
MAX_URI_CHARS = 2048


@dataclass(frozen=True)
class JobSpec:
    """What a client asked for: one input, an output or none (the server's default), and
    blipserve's own options for this job."""

    input_uri: str
    input_type: UriType
    output_uri: str | None = None
    output_type: UriType | None = None
    overrides: Mapping[str, Any] = field(default_factory=dict)  # (params as its JSON)

    @property
    def params(self) -> GenerationParams:
        return GenerationParams.parse(self.overrides.get("params", {}), where=_OURS + ".params")

    def to_json(self) -> dict[str, Any]:
        return {
            "input_uri": self.input_uri,
            "input_type": self.input_type,
            "output_uri": self.output_uri,
            "output_type": self.output_type,
            "overrides": dict(self.overrides),
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> JobSpec:
        return cls(
            input_uri=raw["input_uri"],
            input_type=raw["input_type"],
            output_uri=raw.get("output_uri"),
            output_type=raw.get("output_type"),
            overrides=dict(raw.get("overrides") or {}),
        )


_OURS = "properties.blipserve"


def parse_job_request(body: object) -> JobSpec:
    """The job a ``POST /jobs`` body asks for; :class:`InvalidInput` naming the field."""
    top = load_json_object(body, "the request body")
    props = top.get("properties")
    if not isinstance(props, Mapping):
        raise InvalidInput(
            "properties: required, an object holding InputData (and OutputData), as the "
            "catalog's batch endpoints take it"
            if props is None
            else f"properties: expected an object, got {json_type(props)}"
        )
    in_uri, in_type = _one(props, "InputData", "JobInputType")
    out_uri: str | None = None
    out_type: UriType | None = None
    if props.get("OutputData") not in (None, {}):  # (empty: none, the server's default)
        out_uri, out_type = _one(props, "OutputData", "JobOutputType")
    return JobSpec(in_uri, in_type, out_uri, out_type, _overrides(props.get("blipserve")))


def _one(props: Mapping[str, Any], key: str, type_key: str) -> tuple[str, UriType]:
    """The one entry of ``properties.<key>``: its URI and type."""
    entries = props.get(key)
    where = f"properties.{key}"
    if not isinstance(entries, Mapping):
        raise InvalidInput(
            f"{where}: required, an object naming one {'input' if key == 'InputData' else 'output'}"
            if entries is None
            else f"{where}: expected an object, got {json_type(entries)}"
        )
    if len(entries) != 1:
        raise InvalidInput(
            f"{where}: a deployment of this model takes exactly one; got {len(entries)}"
            + (f" ({', '.join(quote(str(k), 40) for k in list(entries)[:5])})" if entries else "")
        )
    [(name, entry)] = entries.items()
    where = f"{where}.{name}"
    if not isinstance(entry, Mapping):
        raise InvalidInput(f"{where}: expected an object, got {json_type(entry)}")
    kind = entry.get(type_key)
    if kind not in URI_TYPES:
        got = "missing" if kind is None else f"got {quote(str(kind), 40)}"
        raise InvalidInput(f"{where}.{type_key}: expected UriFolder or UriFile; {got}")
    uri = entry.get("Uri")
    if not isinstance(uri, str) or not uri.strip():
        raise InvalidInput(f"{where}.Uri: required, a URI (az://, https://, azureml://, ...)")
    if len(uri) > MAX_URI_CHARS or any(ord(c) < 32 for c in uri):
        raise InvalidInput(f"{where}.Uri: not a URI (control characters, or too long)")
    unknown = set(entry) - {type_key, "Uri", "Mode", "Description"}
    if unknown:
        raise InvalidInput(f"{where}: unknown field {quote(sorted(unknown)[0], 40)}")
    return uri.strip(), typing.cast(UriType, kind)


def _overrides(raw: object) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise InvalidInput(f"{_OURS}: expected an object, got {json_type(raw)}")
    for name, value in raw.items():
        where = f"{_OURS}.{name}"
        if name not in OVERRIDES:
            known = ", ".join(OVERRIDES)
            raise InvalidInput(f"{where}: unknown option; a job may set {known}")
        if name == "params":
            GenerationParams.parse(value, where=where)  # (checked now; kept as sent)
        elif name == "retry_errors":
            if not isinstance(value, bool):
                raise InvalidInput(f"{where}: expected {OVERRIDES[name]}, got {json_type(value)}")
        elif not isinstance(value, str) or (name == "format" and value not in FORMATS):
            raise InvalidInput(f"{where}: expected {OVERRIDES[name]}, got {quote(str(value), 40)}")
    return dict(raw)


__all__ = ["FORMATS", "OVERRIDES", "URI_TYPES", "JobSpec", "UriType", "parse_job_request"]
