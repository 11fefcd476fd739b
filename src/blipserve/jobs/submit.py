"""A job as the server takes it: its client's URIs resolved, allowed, and checked before
it is queued, so every mistake is a 4xx naming the field, not a job that fails later."""

from __future__ import annotations

from typing import TYPE_CHECKING

from blipserve.batch.shards import check_text_from, is_pattern
from blipserve.batch.sinks import infer_format
from blipserve.batch.sources import check_input
from blipserve.batch.storage import Location, StorageError, locate
from blipserve.contracts.batch_jobs import FORMATS, JobSpec
from blipserve.errors import Conflict, Forbidden, InvalidInput, quote
from blipserve.jobs.table import JobRecord

if TYPE_CHECKING:
    from blipserve.jobs.host import JobHost

IN, OUT = "properties.InputData", "properties.OutputData"


def resolve_job(host: JobHost, spec: JobSpec, name: str) -> JobRecord:
    """The record of a new job named ``name``; raises what is wrong with ``spec``."""
    source = host.resolver.locate(spec.input_uri, f"{IN}.Uri")
    _check_input(source, spec)
    try:
        check_text_from(spec.overrides.get("text_from"))
    except InvalidInput as exc:
        raise InvalidInput(f"properties.blipserve.text_from: {exc.message}") from None
    output = _output(host, spec, name)
    shards_out = spec.overrides.get("format") == "webdataset"
    if not shards_out:
        try:
            infer_format(output, spec.overrides.get("format"))
        except InvalidInput:
            raise InvalidInput(
                f"{OUT}: cannot tell the format of {quote(str(output), 200)} from its name; "
                f"set properties.blipserve.format ({', '.join(FORMATS)})"
            ) from None
    try:
        exists = output.exists()
        if output.local:  # (a store has no folders: any name can hold an object)
            _check_local_folders(output)
    except (StorageError, OSError) as exc:
        raise _unusable(f"{OUT}.Uri", exc) from None
    if exists and not shards_out:  # (captioned shards: written ones are kept, never redone)
        raise Conflict(
            f"{OUT}.Uri: {quote(str(output), 200)} exists already; a job writes a new file "
            "(no job overwrites another's results)"
        )
    summary_only = host.config.output_action == "summary_only"
    return JobRecord(name, spec, str(source), str(output), summary_only=summary_only)


def _unusable(where: str, exc: Exception) -> InvalidInput | Forbidden:
    """A store's or a disk's refusal as the field's 4xx (403 for a permission)."""
    if isinstance(exc, PermissionError):
        return Forbidden(f"{where}: the server's credentials may not use it: {exc}")
    message = exc.message if isinstance(exc, StorageError) else f"{type(exc).__name__}: {exc}"
    return InvalidInput(f"{where}: {message}")


def _check_local_folders(output: Location) -> None:
    """Refuse now an output whose folder cannot be made (a file in the way)."""
    folder = output.parent
    while folder.path not in ("", "/") and not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise InvalidInput(
            f"{OUT}.Uri: cannot write {quote(str(output), 200)}: {quote(str(folder), 200)} is "
            "a file, not a folder"
        )


def _check_input(source: Location, spec: JobSpec) -> None:
    where = f"{IN}.Uri"
    try:
        check_input(source)
        if is_pattern(source.path):
            return
        if spec.input_type == "UriFolder" and not source.is_dir():
            raise InvalidInput(
                f"{where}: {quote(str(source), 200)} is a file; its JobInputType is "
                "UriFolder (use UriFile)"
            )
        if spec.input_type == "UriFile" and not source.is_file():
            raise InvalidInput(
                f"{where}: {quote(str(source), 200)} is a folder; its JobInputType is "
                "UriFile (use UriFolder)"
            )
    except (StorageError, OSError) as exc:  # no such store, bad credentials, unreachable
        raise _unusable(where, exc) from None
    except InvalidInput as exc:
        if exc.message.startswith(where):
            raise
        raise InvalidInput(f"{where}: {exc.message}") from None


def _output(host: JobHost, spec: JobSpec, name: str) -> Location:
    """Where the job's results go: the client's file, ``output_file_name`` in the client's
    folder, or the server's default; summary_only: the jobs folder (no client file)."""
    file_name = host.config.output_file_name
    options = host.settings.batch.storage_options
    if host.config.output_action == "summary_only":
        return host.table.folder.child("work").child(name).child("results.jsonl")
    if spec.output_uri is None:
        place = locate(host.output_root, options).child(name).child(file_name)
        if not host.resolver.allowed(place):
            raise Forbidden(
                f"{OUT}: none given, and this server's default output ({quote(str(place), 200)}, "
                "--jobs-output-root) is outside --jobs-allow-root; give OutputData"
            )
        return place
    place = host.resolver.locate(spec.output_uri, f"{OUT}.Uri")
    if spec.output_type == "UriFile" or spec.overrides.get("format") == "webdataset":
        return place  # (captioned shards go into the folder itself)
    return place.child(file_name)


__all__ = ["resolve_job"]
