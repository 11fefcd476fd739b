"""The batch parts of the configuration: a job's options and how it runs on Ray.

``blipserve batch``'s flags derive from these fields as the serving ones do; the
:class:`~blipserve.batch.options.BatchOptions` of a job adds its input and generation
parameters to :class:`BatchConfig`, so each default is declared here once.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from blipserve.config.fields import option
from blipserve.errors import InvalidInput, quote

OutputFormat = Literal["jsonl", "csv", "parquet", "catalog", "imagefolder", "webdataset"]


@dataclass(frozen=True)
class FailureLimit:
    """``--max-failures``: ``N`` rows, or ``N%`` of the rows this run attempts (the catalog's
    ``error_threshold``).  Exceeding it stops the job with an error."""

    count: int | None = None
    percent: float | None = None

    @classmethod
    def parse(cls, text: str | None) -> FailureLimit | None:
        if text is None or not text.strip():
            return None
        value = text.strip()
        try:
            if value.endswith("%"):
                percent = float(value[:-1])
                if not 0 <= percent <= 100:
                    raise ValueError
                return cls(percent=percent)
            count = int(value)
            if count < 0:
                raise ValueError
            return cls(count=count)
        except ValueError:
            raise InvalidInput(
                "--max-failures wants a number of rows (10) or a percentage (1%), "
                f"got {quote(value)}"
            ) from None

    def exceeded(self, failed: int, attempted: int, bound: int | None = None) -> bool:
        """Whether ``failed`` of ``attempted`` rows break the limit.  A percentage is judged
        on the whole run (``attempted`` at its end), or early against ``bound``, a number
        of rows the run cannot exceed (the input's, when it is known)."""
        if self.count is not None:
            return failed > self.count
        assert self.percent is not None
        of = attempted if bound is None else bound
        return failed > self.percent / 100 * of

    def __str__(self) -> str:
        return f"{self.percent:g}%" if self.percent is not None else str(self.count)


def parse_storage_options(pairs: list[str] | None) -> dict[str, Any]:
    """``--storage-option key=value`` pairs as fsspec keyword arguments.

    Values are JSON where they parse as JSON (``anon=true``, ``max_concurrency=8``,
    ``client_kwargs={"region_name": "eu-west-1"}``), text otherwise.
    """
    options: dict[str, Any] = {}
    for pair in pairs or []:
        key, eq, value = pair.partition("=")
        if not eq or not key.strip():
            raise InvalidInput(f"--storage-option wants KEY=VALUE, got {quote(pair, 40)}")
        try:
            options[key.strip()] = json.loads(value)
        except ValueError:
            options[key.strip()] = value
    return options


@dataclass(frozen=True)
class BatchConfig:
    """A batch job (``blipserve batch``): where results go, how rows are read and judged."""

    output: str | os.PathLike[str] | None = option(
        None,
        "Results file: .jsonl, .csv, .parquet, predictions.csv (the catalog's batch output) "
        "or metadata.jsonl (Hugging Face imagefolder); for shard input, a folder to write "
        "the captioned shards into (--format webdataset); a local path or an object-store URL.",
        short="-o",
        env=False,
        commands=("batch",),
    )
    format: OutputFormat | None = option(
        None,
        "Output format when the output's name doesn't say.",
        env=False,
        commands=("batch",),
    )
    sidecar: str | None = option(
        None,
        "Also write each caption next to its image, e.g. .txt (photo.jpg -> photo.txt).",
        metavar="SUFFIX",
        commands=("batch",),
    )
    sidecar_captions: Literal["best", "all"] = option(
        "best",
        "What a sidecar holds when each image gets several captions (--num-return-sequences): "
        "the best one, or all of them, one a line, best first.",
    )
    overwrite: bool = option(
        False,
        "Start over: ignore earlier results and replace existing sidecars.",
        env=False,
        commands=("batch",),
    )
    retry_errors: bool = option(False, "On resume, run again the rows that failed last time.")
    prompt: str | None = option(
        None,
        "Text for rows without any (e.g. one question for all).",
        env=False,
        commands=("batch",),
    )
    text_from: str | None = option(
        None,
        "WebDataset input: each sample's text from KEY.txt, or from FIELD of KEY.json "
        "(unset: none, caption from scratch).",
        metavar="txt|json:FIELD",
        commands=("batch",),
    )
    caption_key: str = option(
        "caption",
        "WebDataset output: the caption goes to KEY.NAME.txt and the NAME field of KEY.json.",
        metavar="NAME",
    )
    filter_model: str | None = option(
        None,
        "CapFilt: an image-text matching model that scores each caption and original text "
        "(e.g. Salesforce/blip-itm-base-coco).",
        metavar="MODEL",
        commands=("batch",),
    )
    min_match: float = option(
        0.5, "CapFilt: keep pairs whose match probability reaches this.", commands=("batch",)
    )
    chunk_rows: int = option(
        64,
        "Rows decoded ahead and journaled together; a model batch never spans two chunks, "
        "so this caps the batch size (64: a GPU's default --max-batch-size).",
    )
    read_workers: int = option(
        16, "Image files read at once, ahead of the model (object stores want many in flight)."
    )
    max_failures: FailureLimit | None = option(
        None,
        "Stop with exit status 3 when more than N rows (or N% of the rows) fail (the "
        "catalog's error_threshold; unset: never stop for failed rows).",
        metavar="N|N%",
        parse=FailureLimit.parse,
    )
    progress: bool | None = option(
        None,
        "Progress bar (unset: on a terminal; log lines otherwise).",
        commands=("batch",),
    )
    log_every_s: float = option(10.0, "Seconds between progress log lines (without a bar).")
    storage_options: Mapping[str, Any] = option(
        {},
        "An option for the object store's filesystem (adlfs, s3fs, gcsfs), e.g. anon=true, "
        "endpoint_url=http://127.0.0.1:9000, account_name=NAME; VALUE is JSON where it "
        "parses as JSON. Repeatable. Credentials are better left to the libraries' own "
        "variables (AZURE_STORAGE_CONNECTION_STRING, AWS_ACCESS_KEY_ID, ...).",
        flag="--storage-option",
        metavar="KEY=VALUE",
        env=False,
        parse=parse_storage_options,
        repeatable=True,
        secret=True,
    )

    def __post_init__(self) -> None:
        if self.chunk_rows < 1 or self.read_workers < 1:
            raise ValueError(
                f"chunk_rows and read_workers must be at least 1; got {self.chunk_rows} "
                f"and {self.read_workers}"
            )
        if not 0 <= self.min_match <= 1:
            raise ValueError(f"min_match is a probability (0 to 1); got {self.min_match}")


@dataclass(frozen=True)
class RayConfig:
    """Which Ray cluster blipserve's work runs on, when it runs on Ray: a batch job's model
    actors on Ray Data (pip install 'blipserve[ray]') or the server's replicas on Ray Serve
    ('blipserve[serve]')."""

    ray: bool = option(
        False, "Run on Ray: a batch job on Ray Data; the server as Ray Serve replicas."
    )
    ray_address: str | None = option(
        None, "Ray cluster to join (unset: start a local one, or use the one already joined)."
    )
    concurrency: int = option(1, "Model actors, one engine each.", commands=("batch",))
    num_gpus: float = option(0.0, "GPUs per model actor (batch) or server replica (serve).")

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.num_gpus < 0:
            raise ValueError(
                f"concurrency must be at least 1 and num_gpus at least 0; got "
                f"{self.concurrency} and {self.num_gpus}"
            )


def parse_autoscale(raw: str | list[str]) -> tuple[int, int]:
    """``MIN:MAX`` replicas, e.g. ``1:4``."""
    text = raw if isinstance(raw, str) else raw[-1]
    low, sep, high = text.partition(":")
    try:
        bounds = (int(low), int(high))
    except ValueError:
        bounds = (-1, -1)
    if not sep or bounds[0] < 0 or bounds[1] < max(1, bounds[0]):
        raise InvalidInput(
            f"expected MIN:MAX replicas with 0 <= MIN <= MAX and MAX >= 1, e.g. 1:4; got {text!r}"
        )
    return bounds


@dataclass(frozen=True)
class ReplicaConfig:
    """The server's replicas on Ray Serve (``blipserve serve --ray``): how many, and what
    each holds. Each replica loads the model once and batches its own requests; Serve's
    proxy routes requests between them."""

    replicas: int = option(1, "Replicas, one engine each (unless --autoscale).")
    autoscale: tuple[int, int] | None = option(
        None,
        "Scale between MIN and MAX replicas on the requests each one has in flight "
        "(instead of --replicas).",
        metavar="MIN:MAX",
        parse=parse_autoscale,
    )
    num_cpus: float = option(
        1.0,
        "CPUs per replica: Ray reserves them, and a replica runs torch on that many threads "
        "(rounded up) unless --torch-threads says otherwise.",
    )
    max_ongoing_requests: int = option(
        0,
        "Requests Serve sends one replica at once; more wait in the proxy. 0: four times the "
        "replica's batch size (8 on a CPU, 64 on a GPU), so its queue can fill batches while "
        "one runs. Autoscaling aims at half of it per replica.",
    )

    def __post_init__(self) -> None:
        if self.replicas < 1 or self.num_cpus <= 0 or self.max_ongoing_requests < 0:
            raise ValueError(
                f"replicas must be at least 1, num_cpus above 0 and max_ongoing_requests at "
                f"least 0; got {self.replicas}, {self.num_cpus} and {self.max_ongoing_requests}"
            )
        if self.autoscale is not None and self.replicas != 1:
            raise ValueError("give --replicas or --autoscale, not both")
