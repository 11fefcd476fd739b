"""The /ui page in a real browser: Debian's headless Chromium driven by Playwright.

Servers are real ``blipserve serve`` processes on port 0 (``--port-file``, then ``/ready``
polled), started once per session and only when a test needs them; the browser is launched
once. Screenshots of each state go to ``<pytest basetemp>/ui-screenshots/``.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, BrowserContext, ConsoleMessage, expect, sync_playwright

from browser.ui_support import API_KEY, PageProblems, Server
from testkit import live_server
from testkit.live_server import Launched, stop_all, wait_ready

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Generous waits for the model's answers on a small, busy CPU; a pass takes far less.
TIMEOUT_MS = 30_000


def find_chromium() -> str | None:
    for candidate in ("/usr/bin/chromium", shutil.which("chromium")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def launch(workdir: Path, *args: str) -> Launched:
    """Start the real ``blipserve serve ARGS`` on port 0."""
    command = live_server.serve_command([sys.executable, "-m", "blipserve.cli"], *args)
    return live_server.launch(command, workdir)


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], Server]]:
    """name -> a running server: ``demo``, ``demo-vqa``, or ``demo-key`` (needs API_KEY).

    The first use starts all three at once (loading in parallel is quicker than one after
    another); each then serves the rest of the session."""
    configs = {
        "demo": ["--model", "demo"],
        "demo-vqa": ["--model", "demo-vqa"],
        "demo-key": ["--model", "demo", "--api-key", API_KEY],
    }
    starting: dict[str, Launched] = {}
    running: dict[str, Server] = {}

    def get(name: str) -> Server:
        if not starting:
            for each, args in configs.items():
                starting[each] = launch(tmp_path_factory.mktemp(f"server-{each}"), *args)
        if name not in running:
            running[name] = wait_ready(starting[name])
        return running[name]

    yield get
    stop_all(list(starting.values()))


@pytest.fixture(scope="session")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.getbasetemp() / "ui-screenshots"
    folder.mkdir(exist_ok=True)
    return folder


# Module scope, not session: Playwright's sync API runs an asyncio loop in this thread
# while it is open, which would break every later test that calls asyncio.run().
@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    chromium = find_chromium()
    if chromium is None:
        pytest.skip(
            "no Chromium at /usr/bin/chromium or on PATH (scripts/install_chromium.sh installs it)"
        )
    expect.set_options(timeout=TIMEOUT_MS)
    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    """A fresh browser profile per test (nothing remembered between tests)."""
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    ctx.set_default_timeout(TIMEOUT_MS)
    yield ctx
    ctx.close()


@pytest.fixture
def problems(context: BrowserContext) -> Iterator[PageProblems]:
    found = PageProblems([])

    def on_console(message: ConsoleMessage) -> None:
        # A fetch answered 4xx is logged by Chromium as "Failed to load resource": expected.
        if message.type == "error" and "Failed to load resource" not in message.text:
            found.errors.append(message.text)

    context.on("console", on_console)
    context.on("weberror", lambda error: found.errors.append(str(error.error)))
    yield found
    found.check()
