"""The batch endpoint's part of the configuration: batch jobs the server hosts (``POST
/jobs``), the way the catalog's batch endpoints take them.

The catalog's deployment settings map to blipserve's options where blipserve has the
concept: ``mini_batch_size`` is ``--chunk-rows`` (rows read, run and journaled together),
``error_threshold`` is ``--max-failures`` (its -1, "never stop", is leaving it unset),
``output_file_name``, ``output_action``, ``retry_settings.max_retries`` and
``logging_level`` are the fields below.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from blipserve.config.fields import option
from blipserve.errors import InvalidInput, quote


def parse_datastores(pairs: str | list[str]) -> dict[str, str]:
    """``--datastore NAME=URL`` pairs: what ``azureml://datastores/NAME/paths/...`` means."""
    stores: dict[str, str] = {}
    for item in pairs.split(",") if isinstance(pairs, str) else pairs:
        name, eq, url = item.strip().partition("=")
        if not eq or not name.strip() or ("://" not in url and not url.startswith("/")):
            raise InvalidInput(
                "--datastore wants NAME=URL (e.g. workspaceblobstore=az://data), got "
                f"{quote(item, 60)}"
            )
        stores[name.strip()] = url.strip().rstrip("/")
    return stores


def parse_roots(raw: str | list[str]) -> tuple[str, ...]:
    """``--jobs-allow-root`` values (repeated, or comma-separated in the variable)."""
    texts = raw.split(",") if isinstance(raw, str) else raw
    return tuple(text.strip() for text in texts if text.strip())


LogLevel = Literal["debug", "info", "warning", "error"]


@dataclass(frozen=True)
class JobsConfig:
    """Batch jobs hosted by the server (``POST /jobs``, the catalog's batch endpoint): off
    unless ``--jobs-dir`` is given; inputs and outputs only under ``--jobs-allow-root``."""

    jobs_dir: str | None = option(
        None,
        "Folder of the server's batch-job table (a local path or an object-store URL); "
        "POST /jobs is on when it is set. Jobs in it survive a restart and resume.",
        metavar="DIR|URL",
    )
    jobs_allow_root: tuple[str, ...] = option(
        (),
        "A folder (local path or store URL) that jobs may read and write under; repeatable. "
        "None given: jobs read and write nothing (every URI is refused with 403).",
        metavar="DIR|URL",
        repeatable=True,
        parse=parse_roots,
    )
    datastore: Mapping[str, str] = option(
        {},
        "What azureml://datastores/NAME/paths/... means: NAME=URL, e.g. "
        "workspaceblobstore=az://data; repeatable.",
        metavar="NAME=URL",
        repeatable=True,
        parse=parse_datastores,
    )
    jobs_output_root: str | None = option(
        None,
        "Where a job without OutputData writes (JOB-NAME/predictions.csv under it); unset: "
        "the jobs folder's outputs/ (must be under an allowed root to be written).",
        metavar="DIR|URL",
    )
    max_running_jobs: int = option(
        1, "Jobs run at once, on the server's engine, in the order they came."
    )
    max_waiting_jobs: int = option(
        100, "Jobs queued or running at most; more are refused (429) until some end."
    )
    jobs_kept: int = option(
        1000, "Finished jobs kept in the job table; the oldest are forgotten past it."
    )
    jobs_on_ray: str | None = option(
        None,
        "Run jobs on this Ray cluster (an address, or 'local' to start one) as "
        "'blipserve batch --ray' does; the server only submits and tracks them.",
        metavar="ADDRESS",
    )
    jobs_share: float = option(
        0.1,
        "While requests come, the most of the model's time a job's calls take (0-1); a "
        "job runs full batches back to back once none came for 10 s.",
    )
    output_file_name: str = option(
        "predictions.csv",
        "The catalog's output_file_name: the results file a job writes into a UriFolder output.",
    )
    output_action: Literal["append_row", "summary_only"] = option(
        "append_row",
        "The catalog's output_action: append_row writes every row's result; summary_only "
        "writes no results file (the job's record keeps the counts).",
    )
    job_retries: int = option(
        3,
        "The catalog's retry_settings.max_retries: times a job that stopped on a storage "
        "error starts again (from its journal) before it is Failed.",
    )
    job_log_level: LogLevel = option(
        "info", "The catalog's logging_level: the level of a job's own log lines."
    )

    def __post_init__(self) -> None:
        if min(self.max_running_jobs, self.max_waiting_jobs, self.jobs_kept) < 1:
            raise ValueError(
                "max_running_jobs, max_waiting_jobs and jobs_kept must be at least 1; got "
                f"{self.max_running_jobs}, {self.max_waiting_jobs} and {self.jobs_kept}"
            )
        if not 0 < self.jobs_share <= 1 or self.job_retries < 0:
            raise ValueError(
                f"jobs_share is a fraction above 0 (at most 1) and job_retries at least 0; "
                f"got {self.jobs_share} and {self.job_retries}"
            )
        if "/" in self.output_file_name or not self.output_file_name.strip():
            raise ValueError(f"output_file_name is a file name; got {self.output_file_name!r}")
