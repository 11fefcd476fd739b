"""Real server processes on free ports, polled until ready.

A server is any command that takes ``--port 0 --port-file FILE`` (``blipserve serve``, the
tests' launcher, the benchmarks' baseline server): it binds a free port and writes it to
FILE; :func:`wait_ready` then polls ``GET /ready`` until it answers 200.  Its output goes
to a log file in its work folder.  Used by tests/integration, tests/hardening,
tests/browser (fixtures in tests/conftest.py and tests/browser/conftest.py) and by the
benchmarks that measure a server over HTTP (bench/server.py, bench/jobs_online.py,
bench/ray_serve.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx


class ServerNotReady(RuntimeError):
    """A server exited, or did not answer ``GET /ready`` in time; the message holds its
    log."""


@dataclass
class RunningServer:
    """A server process listening on ``url``; its output goes to ``log``."""

    url: str
    proc: subprocess.Popen[bytes]
    log: Path
    argv: list[str]
    name: str = "server"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        """Send ``sig`` (SIGTERM: requests in flight finish) and wait for the exit code;
        SIGKILL after ``timeout`` seconds (then the code is ``-SIGKILL``)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)

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


@dataclass(frozen=True)
class Launched:
    """A server process started by :func:`launch`, not known to be ready yet."""

    proc: subprocess.Popen[bytes]
    port_file: Path
    log: Path
    argv: list[str]
    name: str


def launch(
    argv: Sequence[str],
    workdir: Path,
    *,
    name: str = "server",
    env: Mapping[str, str] | None = None,
) -> Launched:
    """Start ``argv --port 0 --port-file WORKDIR/NAME.port``, its output to
    ``WORKDIR/NAME.log``, offline (``HF_HUB_OFFLINE=1``) and with ``env`` added."""
    workdir.mkdir(parents=True, exist_ok=True)
    port_file = workdir / f"{name}.port"
    port_file.unlink(missing_ok=True)
    log = workdir / f"{name}.log"
    full = [*argv, "--port", "0", "--port-file", str(port_file)]
    environ = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    with log.open("wb") as out:
        proc = subprocess.Popen(full, stdout=out, stderr=subprocess.STDOUT, env=environ)
    return Launched(proc, port_file, log, full, name)


def wait_ready(launched: Launched, timeout: float = 120) -> RunningServer:
    """Poll until the server ``launched`` answers ``GET /ready`` with 200.

    Raises :class:`ServerNotReady` with the server's output if it exits first or is not
    ready after ``timeout`` seconds (then it is killed).
    """
    proc, log, name = launched.proc, launched.log, launched.name
    deadline = time.monotonic() + timeout
    url = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerNotReady(
                f"{name} exited with {proc.returncode}:\n{log.read_text(errors='replace')}"
            )
        if url is None and launched.port_file.exists():
            url = f"http://127.0.0.1:{launched.port_file.read_text().strip()}"
        if url is not None:
            try:
                if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                    return RunningServer(url, proc, log, launched.argv, name)
            except httpx.TransportError:
                pass
        time.sleep(0.1)
    proc.kill()
    proc.wait(10)
    raise ServerNotReady(
        f"{name} not ready after {timeout:.0f} s:\n{log.read_text(errors='replace')}"
    )


def start_server(
    argv: Sequence[str],
    workdir: Path,
    *,
    name: str = "server",
    timeout: float = 120,
    env: Mapping[str, str] | None = None,
) -> RunningServer:
    """:func:`launch` then :func:`wait_ready`: a started server, answering ``/ready``."""
    return wait_ready(launch(argv, workdir, name=name, env=env), timeout)


def serve_command(command: Sequence[str], *args: str) -> list[str]:
    """``COMMAND serve --log-level warning ARGS``: a blipserve server as the tests start it
    (``command`` is ``blipserve``, ``python -m blipserve.cli`` or the tests' launcher)."""
    return [*command, "serve", "--log-level", "warning", *args]


def stop_all(servers: Sequence[Launched | RunningServer]) -> None:
    """Stop servers: SIGTERM to each, then wait (SIGKILL for one that will not stop)."""
    for server in servers:
        if server.proc.poll() is None:
            server.proc.terminate()
    for server in servers:
        try:
            server.proc.wait(30)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait(10)
