"""The server's logs as JSON lines for a log pipeline (``--log-format json``), each line
carrying the id of the request it is about.

The request id is the one the client sent (``x-request-id``) or one made up, the same that
the response echoes (the catalog's ``x-ms-client-request-id`` goes in ``client_request_id``
on the access line); the request
context middleware (:mod:`blipserve.server.http`) sets it for the request's task, and
every record logged while that request is handled on the event loop or in a thread started
with its context (``asyncio.to_thread``) carries it.  One access line per request
(``blipserve.access``) gives its method, path, status and duration.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
import sys
from typing import Any

#: the id of the request being handled (None outside requests)
REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "blipserve_request_id", default=None
)
access_log = logging.getLogger("blipserve.access")

# Attributes every LogRecord has; anything else was passed in ``extra=`` and is kept.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",  # uvicorn's message again, with terminal colours
}


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ``time`` (UTC, ISO 8601), ``level``, ``logger``,
    ``message``, ``request_id`` when there is one, ``exception`` when there is one, and
    whatever the call passed as ``extra``."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None) or REQUEST_ID.get()
        if request_id:
            line["request_id"] = request_id
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in line:
                line[key] = value if _is_json(value) else repr(value)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=repr)


def configure_json(level: str) -> None:
    """Every logger (blipserve's, uvicorn's, the libraries') and Python's warnings to
    stderr as JSON lines, at ``level`` for blipserve and uvicorn."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    logging.captureWarnings(True)  # a library's warnings as lines of the same format
    numeric = logging.getLevelName(level.upper())
    for name in ("blipserve", "uvicorn", "uvicorn.error"):
        logging.getLogger(name).setLevel(numeric)
    # uvicorn's own handlers would print its lines a second time, in its format
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


def configure_package_json(level: str) -> None:
    """blipserve's own loggers to stderr as JSON lines at ``level``, leaving the root logger
    to its owner: where another framework configures the process (a Ray Serve replica),
    the access lines and the engine's warnings still come out, as JSON."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    package = logging.getLogger("blipserve")
    package.handlers[:] = [handler]
    package.setLevel(logging.getLevelName(level.upper()))
    package.propagate = False


def _is_json(value: object) -> bool:
    return isinstance(value, (str, int, float, bool, type(None), list, dict))
