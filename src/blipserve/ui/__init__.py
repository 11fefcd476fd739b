"""The page at ``/ui`` for trying a model in a browser: static files, no build step.

``static/`` holds hand-written HTML, CSS and JavaScript (``ui.js`` for trying the model,
``jobs.js`` for the batch jobs' table; every file in it is served); the page calls the
server's own ``/ready``, ``/score``, ``/v1/chat/completions`` and ``/jobs`` routes (with
the API key the user types, when the server needs one), so the files themselves are open
to everyone.
"""

from __future__ import annotations

import os
from pathlib import Path

from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

STATIC_DIR = Path(__file__).with_name("static")

#: The page runs only its own script and talks only to its own server; images may come
#: from anywhere (the user's files as blob: URLs, or the URLs they type).
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' blob: data: http: https:",
        "connect-src 'self'",
        "form-action 'none'",
        "base-uri 'none'",
        "frame-ancestors 'none'",
    ]
)
HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate (ETag), so an upgraded server serves its page
}


class _PageFiles(StaticFiles):
    """Starlette's static files, with the security headers above on every file."""

    def file_response(
        self,
        full_path: str | os.PathLike[str],
        stat_result: os.stat_result,
        scope: Scope,
        status_code: int = 200,
    ) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers.update(HEADERS)
        return response


def static_app() -> StaticFiles:
    """An ASGI app serving the page; mount it at ``/ui`` (``/ui`` redirects to ``/ui/``)."""
    return _PageFiles(directory=STATIC_DIR, html=True)
