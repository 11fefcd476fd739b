"""``GET /docs``: Swagger UI from files installed with blipserve, so the page works offline.

FastAPI's own ``/docs`` page loads Swagger UI's script and stylesheet from a CDN; without
internet access (an isolated cluster, a laptop on a plane) it stays blank.  This is
FastAPI's documented self-hosting: the app is created with ``docs_url=None`` and this page
points ``get_swagger_ui_html`` at a local mount of Swagger UI's files, which the
``fastapi-offline`` package ships (Swagger UI 5, which renders OpenAPI 3.1).
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

DOCS_URL = "/docs"
ASSETS_URL = "/docs/assets"
_ASSETS_PACKAGE = ("fastapi_offline", "static")


def serve_docs(app: FastAPI) -> None:
    """Add ``GET /docs`` and its assets under ``/docs/assets/`` to ``app``."""
    app.mount(ASSETS_URL, StaticFiles(packages=[_ASSETS_PACKAGE]), name="docs-assets")

    @app.get(DOCS_URL, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        # Same-origin paths, behind the same proxy prefix as the app (root_path).
        root = request.scope.get("root_path", "")
        assets = f"{root}{ASSETS_URL}"
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{assets}/swagger-ui-bundle.js",
            swagger_css_url=f"{assets}/swagger-ui.css",
            swagger_favicon_url=f"{assets}/favicon.png",
            swagger_ui_parameters=app.swagger_ui_parameters,
        )
