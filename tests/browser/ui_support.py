"""Names the browser tests and their fixtures share (a module, not conftest: ``from
conftest import`` finds whichever conftest was imported first when suites run together)."""

from __future__ import annotations

from dataclasses import dataclass

from live_server import RunningServer

API_KEY = "ui-test-key"
Server = RunningServer  # the name the browser tests use


@dataclass
class PageProblems:
    """What the page reported that a working page never does: script errors, CSP refusals."""

    errors: list[str]

    def check(self) -> None:
        assert not self.errors, self.errors
