"""The batch endpoint's routes, as the catalog's batch endpoints answer them.

``POST /jobs`` (the invoke body, :mod:`blipserve.contracts.batch_jobs`) answers 202 with
the job; ``GET /jobs/{name}`` is the job now (``properties.status`` as the catalog's,
plus its progress); ``GET /jobs`` lists them, newest first, ``top`` at a time from
``skip`` (``nextLink`` to the next page); ``POST /jobs/{name}/cancel`` cancels.  The same
API keys as ``/score``.  Off (404 saying how to turn it on) without ``--jobs-dir``.
"""

from __future__ import annotations

import asyncio
import datetime
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from blipserve.contracts.batch_jobs import parse_job_request
from blipserve.errors import InvalidInput, JobNotFound
from blipserve.jobs.table import JobRecord
from blipserve.server.http import check_auth, read_json_body
from blipserve.server.openapi_jobs import (
    CANCEL_RESPONSES,
    JOB_RESPONSES,
    LIST_OPENAPI,
    LIST_RESPONSES,
    START_JOB_OPENAPI,
    START_JOB_RESPONSES,
)

if TYPE_CHECKING:
    from blipserve.jobs.host import JobHost
    from blipserve.server.app import ServerState

MAX_JOB_BODY_BYTES = 64 * 1024
MAX_PAGE = 100


def encode_job(record: JobRecord) -> dict[str, Any]:
    """A job as the catalog's clients read it (``id`` equals ``name``: clients poll either)."""
    spec = record.spec
    outputs = {}
    if spec.output_uri is not None:
        outputs = {"output": {"JobOutputType": spec.output_type, "Uri": spec.output_uri}}
    return {
        "id": record.name,
        "name": record.name,
        "type": "blipserve/batchJob",
        "properties": {
            "status": record.status,
            "creationTime": _iso(record.created),
            "startTime": _iso(record.started),
            "endTime": _iso(record.ended),
            "InputData": {"input": {"JobInputType": spec.input_type, "Uri": spec.input_uri}},
            "OutputData": outputs,
            "outputFile": None if record.summary_only else record.output,
            "progress": {
                "rowsDone": record.done,
                "rowsFailed": record.failed,
                "rowsSkipped": record.skipped,
                "rowsTotal": record.total,
                "rowsPerSecond": record.rows_per_s,
            },
            "attempts": record.attempts,
            "error": record.error,
            "blipserve": dict(spec.overrides),
        },
    }


def _iso(stamp: float | None) -> str | None:
    if stamp is None:
        return None
    return datetime.datetime.fromtimestamp(stamp, datetime.UTC).isoformat(timespec="seconds")


def _count(request: Request, name: str, default: int, low: int, high: int | None) -> int:
    """A query parameter that counts jobs (a 400 naming it, not FastAPI's 422)."""
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if value < low or (high is not None and value > high):
        limits = f"{low} to {high}" if high is not None else f"at least {low}"
        raise InvalidInput(f"{name}: a whole number, {limits}; got {raw[:20]!r}")
    return value


def batch_jobs_router(state: ServerState) -> APIRouter:
    router = APIRouter(tags=["batch endpoint"])
    keys = state.server.api_keys

    def host() -> JobHost:
        if state.jobs is None:
            raise JobNotFound(
                "batch jobs are off on this server: start it with --jobs-dir DIR and "
                "--jobs-allow-root ROOT"
            )
        return state.jobs

    @router.post(
        "/jobs",
        status_code=202,
        summary="Start a batch job (the catalog's invoke body)",
        responses=START_JOB_RESPONSES,
        openapi_extra=START_JOB_OPENAPI,
    )
    async def start_job(request: Request) -> JSONResponse:
        check_auth(request, keys)
        jobs = host()
        spec = parse_job_request(await read_json_body(request, MAX_JOB_BODY_BYTES))
        record = await asyncio.to_thread(jobs.submit, spec)
        return JSONResponse(
            encode_job(record), status_code=202, headers={"Location": f"/jobs/{record.name}"}
        )

    @router.get(
        "/jobs",
        summary="Batch jobs, newest first",
        responses=LIST_RESPONSES,
        openapi_extra=LIST_OPENAPI,
    )
    async def list_jobs(request: Request) -> JSONResponse:
        check_auth(request, keys)
        jobs = host()
        top = _count(request, "top", 20, 1, MAX_PAGE)
        skip = _count(request, "skip", 0, 0, None)
        records = await asyncio.to_thread(jobs.jobs)
        page = records[skip : skip + top]
        more = skip + top < len(records)
        return JSONResponse(
            {
                "value": [encode_job(r) for r in page],
                "count": len(records),
                "nextLink": f"/jobs?top={top}&skip={skip + top}" if more else None,
            }
        )

    @router.get("/jobs/{name}", summary="A batch job now", responses=JOB_RESPONSES)
    async def get_job(request: Request, name: str) -> JSONResponse:
        check_auth(request, keys)
        return JSONResponse(encode_job(await asyncio.to_thread(host().get, name)))

    @router.post("/jobs/{name}/cancel", summary="Cancel a batch job", responses=CANCEL_RESPONSES)
    async def cancel_job(request: Request, name: str) -> JSONResponse:
        check_auth(request, keys)
        return JSONResponse(encode_job(await asyncio.to_thread(host().cancel, name)))

    return router


__all__ = ["batch_jobs_router", "encode_job"]
