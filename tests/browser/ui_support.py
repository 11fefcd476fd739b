"""Names the browser tests and their fixtures share (a module, not conftest: ``from
conftest import`` finds whichever conftest was imported first when suites run together)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from playwright.sync_api import BrowserContext, Page, expect

from testkit.live_server import RunningServer

API_KEY = "ui-test-key"
Server = RunningServer  # the name the browser tests use


@dataclass
class PageProblems:
    """What the page reported that a working page never does: script errors, CSP refusals."""

    errors: list[str]

    def check(self) -> None:
        assert not self.errors, self.errors


def unlabelled_controls(page: Any, selector: str) -> list[str]:
    """The visible controls among ``selector`` that no label, aria-label or text names."""
    found: list[str] = page.evaluate(
        """(selector) => [...document.querySelectorAll(selector)]
            .filter(e => !e.closest('[hidden]'))
            .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label')
                         && !e.textContent.trim())
            .map(e => e.outerHTML)""",
        selector,
    )
    return found


def open_ui(context: BrowserContext, server: Any, width: int = 1280) -> Page:
    """The /ui page of ``server`` (anything with a ``url``), once its model is ready."""
    page = context.new_page()
    page.set_viewport_size({"width": width, "height": 900})
    page.goto(f"{server.url}/ui")
    expect(page.locator("#model-status")).to_contain_text("is ready")
    return page
