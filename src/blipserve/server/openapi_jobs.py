"""OpenAPI descriptions of the batch endpoint's routes (``/jobs``), whose bodies
:mod:`blipserve.contracts.batch_jobs` parses by hand (every error names the field)."""

# ruff: noqa: N815  (the wire's names are the catalog's: rowsDone, startTime, nextLink)

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from blipserve.server.openapi import json_errors, request_body

UriType = Literal["UriFolder", "UriFile"]
Status = Literal[
    "Queued", "Starting", "Running", "CancelRequested", "Completed", "Failed", "Canceled"
]


class JobInputSchema(BaseModel):
    JobInputType: UriType = Field(description="a folder (images, tables, shards) or one file")
    Uri: str = Field(
        description="https://ACCOUNT.blob.core.windows.net/..., azureml://datastores/NAME/"
        "paths/..., az://, abfs://, s3://, gs:// or a local path, under --jobs-allow-root"
    )


class JobOutputSchema(BaseModel):
    JobOutputType: UriType = Field(
        description="UriFile: that file; UriFolder: --output-file-name in it"
    )
    Uri: str = Field(description="as InputData's Uri; must not exist yet")


class JobOptionsSchema(BaseModel):
    """blipserve's own options for one job."""

    model_config = ConfigDict(extra="forbid")

    format: str | None = Field(None, description="output format (jsonl, csv, parquet, ...)")
    text_from: str | None = Field(None, description="WebDataset input: txt or json:FIELD")
    prompt: str | None = Field(None, description="text for rows without any")
    caption_key: str | None = Field(None, description="WebDataset output: the caption's key")
    retry_errors: bool | None = Field(None, description="run the rows that failed again")
    params: dict[str, Any] | None = Field(None, description="generation settings, as /score's")


class JobPropertiesSchema(BaseModel):
    InputData: dict[str, JobInputSchema] = Field(
        description="exactly one input; its name is yours", min_length=1, max_length=1
    )
    OutputData: dict[str, JobOutputSchema] | None = Field(
        None,
        description="at most one output; none: JOB-NAME/predictions.csv under the server's "
        "--jobs-output-root",
        max_length=1,
    )
    blipserve: JobOptionsSchema | None = None


class JobRequestSchema(BaseModel):
    properties: JobPropertiesSchema


class JobProgressSchema(BaseModel):
    rowsDone: int
    rowsFailed: int
    rowsSkipped: int = Field(description="recorded by an earlier attempt")
    rowsTotal: int | None
    rowsPerSecond: float


class JobErrorSchema(BaseModel):
    code: str
    message: str


class JobStateSchema(BaseModel):
    status: Status
    creationTime: str
    startTime: str | None
    endTime: str | None
    InputData: dict[str, JobInputSchema]
    OutputData: dict[str, JobOutputSchema]
    outputFile: str | None = Field(description="where the results are written (summary_only: none)")
    progress: JobProgressSchema
    attempts: int
    error: JobErrorSchema | None
    blipserve: dict[str, Any]


class JobSchema(BaseModel):
    id: str = Field(description="equal to name: poll /jobs/{id} or /jobs/{name}")
    name: str
    type: str
    properties: JobStateSchema


class JobListSchema(BaseModel):
    value: list[JobSchema] = Field(description="newest first")
    count: int = Field(description="jobs in the table")
    nextLink: str | None = Field(description="the next page, if any")


JOB_ERROR_DESCRIPTIONS = {
    400: "Bad body; the message names the field (properties.InputData..., a URI, ...)",
    403: "A URI outside the folders the server lets jobs use (--jobs-allow-root)",
    404: "No such job (or batch jobs are off: --jobs-dir)",
    409: "The output exists already, another job writes it, or the job has ended",
    429: "As many jobs queued and running as the server takes (see Retry-After)",
}


def job_errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The errors of a /jobs route, described as they mean there."""
    return json_errors(*statuses, **{f"s{k}": v for k, v in JOB_ERROR_DESCRIPTIONS.items()})


def _answer(model: type[BaseModel], description: str) -> dict[str, Any]:
    return {"model": model, "description": description}


_INVOKE = {
    "folder": {
        "summary": "A folder in a datastore to predictions.csv",
        "value": {
            "properties": {
                "InputData": {
                    "images": {
                        "JobInputType": "UriFolder",
                        "Uri": "azureml://datastores/workspaceblobstore/paths/inputs/",
                    }
                },
                "OutputData": {
                    "score": {"JobOutputType": "UriFile", "Uri": "az://data/out/predictions.csv"}
                },
            }
        },
    }
}
START_JOB_OPENAPI = request_body(JobRequestSchema, _INVOKE)
START_JOB_RESPONSES = {
    202: _answer(JobSchema, "The job, Queued (a Location header names it)"),
    **job_errors(400, 401, 403, 404, 409, 413, 415, 429),
}
JOB_RESPONSES = {200: _answer(JobSchema, "The job now"), **job_errors(401, 404)}
CANCEL_RESPONSES = {
    200: _answer(JobSchema, "The job, CancelRequested or Canceled"),
    **job_errors(401, 404, 409),
}
LIST_RESPONSES = {200: _answer(JobListSchema, "A page of jobs"), **job_errors(400, 401, 404)}
LIST_OPENAPI: dict[str, Any] = {
    "parameters": [
        {
            "name": name,
            "in": "query",
            "required": False,
            "description": description,
            "schema": {"type": "integer", "minimum": low, **({"maximum": high} if high else {})},
        }
        for name, description, low, high in [
            ("top", "jobs a page (default 20)", 1, 100),
            ("skip", "jobs skipped (default 0)", 0, None),
        ]
    ]
}
