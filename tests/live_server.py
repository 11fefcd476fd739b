"""Real `blipserve serve` processes on free ports, polled until ready.

Shared by tests/integration, tests/hardening and tests/browser (the fixtures that use these live in
tests/conftest.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai

LAUNCHER = Path(__file__).parent / "integration" / "serve_controllable.py"
#: the API key of the servers the `openai` client's tests start
OPENAI_KEY = "sk-test"


def openai_client_of(server: RunningServer) -> openai.OpenAI:
    """The official client, as an application configures it, for ``server``'s /v1 routes."""
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=OPENAI_KEY, max_retries=0)


@dataclass
class RunningServer:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def metric(self, name: str, headers: Mapping[str, str] | None = None) -> float:
        """``name`` from ``GET /metrics``, summed over its labels."""
        text = httpx.get(f"{self.url}/metrics", headers=headers, timeout=10).text
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith((name + " ", name + "{"))
        )

    def wait_for_metric(
        self,
        name: str,
        at_least: float,
        headers: Mapping[str, str] | None = None,
        timeout: float = 30,
    ) -> None:
        """Poll until ``name`` reaches ``at_least``: how a test learns, from outside the
        server's process, that a request got somewhere.  (``blipserve_decode_seconds_count``
        counts requests whose rows were decoded and so queued: nothing yields in between.)
        """
        deadline = time.monotonic() + timeout
        while self.metric(name, headers) < at_least:
            assert time.monotonic() < deadline, f"{name} did not reach {at_least} in {timeout} s"
            time.sleep(0.05)


def stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    """Stop servers: SIGTERM to each, then wait (SIGKILL for one that will not stop)."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def launch(command: list[str], workdir: Path, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
    """Start ``command serve --port 0 --port-file F --log-level warning ARGS``; output goes
    to ``workdir/server.log``.  Returns the process and its port file."""
    workdir.mkdir(parents=True, exist_ok=True)
    port_file = workdir / "port"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    with (workdir / "server.log").open("wb") as out:
        proc = subprocess.Popen(
            [
                *command,
                *("serve", "--port", "0", "--port-file", str(port_file)),
                *("--log-level", "warning", *args),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    return proc, port_file


def wait_ready(
    proc: subprocess.Popen[bytes], port_file: Path, timeout: float = 120
) -> RunningServer:
    """Poll until the server launched with ``port_file`` answers ``GET /ready`` with 200."""
    log = port_file.with_name("server.log")
    deadline = time.monotonic() + timeout
    url = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{log.read_text()}")
        if url is None and port_file.exists():
            url = f"http://127.0.0.1:{port_file.read_text().strip()}"
        if url is not None:
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    return RunningServer(url, proc, log)
            except httpx.TransportError:
                pass
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"server not ready after {timeout} s:\n{log.read_text()}")


def start_server(model: Path, workdir: Path, *args: str, timeout: float = 120) -> RunningServer:
    """Start the real server (test launcher) on port 0 and wait until /ready answers 200."""
    proc, port_file = launch([sys.executable, str(LAUNCHER)], workdir, "--model", str(model), *args)
    return wait_ready(proc, port_file, timeout)
