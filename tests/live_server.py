"""The tests' own server: the real `blipserve serve` under the test launcher
(tests/integration/serve_controllable.py), on a free port, polled until ready.

Processes, ports and readiness are testkit.live_server's (shared with the benchmarks); the
fixtures that use these live in tests/conftest.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import openai

from testkit import live_server
from testkit.live_server import RunningServer

__all__ = ["LAUNCHER", "OPENAI_KEY", "RunningServer", "openai_client_of", "start_server"]

LAUNCHER = Path(__file__).parent / "integration" / "serve_controllable.py"
#: the API key of the servers the `openai` client's tests start
OPENAI_KEY = "sk-test"


def openai_client_of(server: RunningServer) -> openai.OpenAI:
    """The official client, as an application configures it, for ``server``'s /v1 routes."""
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=OPENAI_KEY, max_retries=0)


def start_server(model: Path, workdir: Path, *args: str, timeout: float = 120) -> RunningServer:
    """The real server for ``model`` (test launcher) on port 0, once /ready answers 200."""
    command = live_server.serve_command([sys.executable, str(LAUNCHER)], "--model", str(model))
    return live_server.start_server([*command, *args], workdir, timeout=timeout)
