"""Typed errors raised anywhere in blipserve.

Every error a user can cause is a :class:`BlipserveError` with a ``status`` (the HTTP
response code) and ``headers`` (e.g. ``Retry-After``) that the HTTP layer sends as they
are, in one handler, and a message that says what was wrong and where.  Row-level errors
carry the row they belong to so that a request with one bad row is answered with a 400
naming that row, and a batch job records the row and goes on.
"""

from __future__ import annotations


def quote(value: str, limit: int = 60) -> str:
    """``value`` for a message: the whole of short text, else a prefix and the length.

    Messages and logs name the cell they are about, but a cell can be hundreds of kilobytes
    of base64: never quote all of it.
    """
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


class BlipserveError(Exception):
    """Base class: ``message`` is safe to show to the client."""

    status: int = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def headers(self) -> dict[str, str]:
        """HTTP headers that go with this error's response."""
        return {}

    def __str__(self) -> str:
        return self.message


class InvalidInput(BlipserveError):
    """The request (or one of its rows) is malformed; HTTP 400."""

    status = 400


class InvalidRequest(InvalidInput):
    """The body as a whole is malformed (not an object, no ``input_data``, bad params)."""


class ImageError(InvalidInput):
    """Bytes that cannot become an image: bad base64, not an image, truncated, too big."""


class FetchError(ImageError):
    """A URL could not be fetched: refused by the guard, timed out, too large, HTTP error."""


class UrlRefused(FetchError):
    """The URL guard refused the URL (scheme, credentials, or an internal address)."""


class RowError(InvalidInput):
    """An error in one row of a request; ``row`` is its position, ``index`` its label.

    ``reason`` is the underlying message without the row prefix, so a batch job can store
    it next to the row it already identifies.
    """

    def __init__(self, row: int, reason: str, index: object | None = None) -> None:
        label = f"row {row}" if index is None or index == row else f"row {row} (index {index!r})"
        super().__init__(f"{label}: {reason}")
        self.row = row
        self.index = index
        self.reason = reason


class UnsupportedTask(InvalidInput):
    """The loaded model cannot do what the row asks (e.g. a question to a caption-only model)."""


class ModelLoadError(BlipserveError):
    """The model could not be loaded; the message names the model and what to do."""

    status = 500


class ModelNotReady(BlipserveError):
    """The engine is not loaded or warmed up yet (``/ready`` and every route); HTTP 503."""

    status = 503

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": "5"}


class ModelNotFound(BlipserveError):
    """A route names a model (or version) this server does not serve; HTTP 404."""

    status = 404


class InferenceError(BlipserveError):
    """The model raised while running a batch; only that batch's requests fail."""

    status = 500


class Unauthorized(BlipserveError):
    """Missing or wrong API key; HTTP 401."""

    status = 401

    @property
    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class PayloadTooLarge(BlipserveError):
    """The request body is larger than the configured limit; HTTP 413."""

    status = 413


class UnsupportedMediaType(BlipserveError):
    """The request body is not JSON; HTTP 415."""

    status = 415


class RequestHeaderTooLarge(BlipserveError):
    """A request header is longer than the server takes (a request id over 100 characters);
    HTTP 431, as the catalog's inference server answers."""

    status = 431


class Overloaded(BlipserveError):
    """The queue is full; HTTP 503 with ``Retry-After``."""

    status = 503

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class DeadlineExceeded(BlipserveError):
    """The request's deadline passed before its rows were done; HTTP 504."""

    status = 504


class ClientDisconnected(BlipserveError):
    """The client went away before its answer was ready; its queued rows are dropped.

    Logged as 499 (nginx's "client closed request"): nobody receives the response.
    """

    status = 499

    def __init__(self) -> None:
        super().__init__("the client disconnected")


class Forbidden(BlipserveError):
    """The key is right but the request asks for what the operator does not allow (a batch
    job's input or output outside ``--jobs-allow-root``); HTTP 403."""

    status = 403


class JobNotFound(BlipserveError):
    """No batch job of that name in the server's job table; HTTP 404."""

    status = 404


class Conflict(BlipserveError):
    """The request clashes with what exists: an output written by another job, or a job
    that cannot change state that way; HTTP 409."""

    status = 409


class JobStopped(BlipserveError):
    """A hosted batch job was canceled or its server is stopping: it ends where it is (its
    finished rows are journaled; it resumes when started again)."""

    status = 503


class TooManyJobs(BlipserveError):
    """The batch endpoint has as many jobs queued and running as it takes
    (``--max-waiting-jobs``); HTTP 429 with ``Retry-After``."""

    status = 429

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": "60"}
