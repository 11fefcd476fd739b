"""``GET /docs`` in a real browser that can reach nothing but the server: Swagger UI must
render every operation from files the server itself serves (FastAPI's default page loads
them from a CDN, and is blank offline)."""

from __future__ import annotations

from collections.abc import Callable

import httpx
from playwright.sync_api import BrowserContext, Route, expect

from browser.ui_support import PageProblems, Server


def test_docs_render_offline(
    context: BrowserContext, servers: Callable[[str], Server], problems: PageProblems
) -> None:
    server = servers("demo")
    elsewhere: list[str] = []

    def same_origin_only(route: Route) -> None:
        if route.request.url.startswith(server.url + "/"):
            route.continue_()
        else:
            elsewhere.append(route.request.url)
            route.abort("internetdisconnected")

    context.route("**/*", same_origin_only)
    page = context.new_page()
    page.goto(f"{server.url}/docs")
    document = httpx.get(f"{server.url}/swagger.json", timeout=10).json()
    operations = [
        (method.upper(), path) for path, item in document["paths"].items() for method in item
    ]
    blocks = page.locator(".opblock-summary")
    expect(blocks).to_have_count(len(operations))
    for method, path in operations:
        block = blocks.filter(has=page.locator(".opblock-summary-method", has_text=method))
        expect(block.filter(has_text=path).first).to_be_visible()
    assert elsewhere == []
