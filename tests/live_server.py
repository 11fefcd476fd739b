"""Real `blipserve serve` processes on free ports, polled until ready.

Shared by tests/integration and tests/hardening (the fixtures that use these live in
tests/conftest.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

LAUNCHER = Path(__file__).parent / "integration" / "serve_controllable.py"


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


def start_server(model: Path, workdir: Path, *args: str, timeout: float = 120) -> RunningServer:
    """Start the real server on port 0 and wait until /ready answers 200."""
    workdir.mkdir(parents=True, exist_ok=True)
    port_file = workdir / "port"
    log = workdir / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                str(LAUNCHER),
                "serve",
                "--model",
                str(model),
                "--port",
                "0",
                "--port-file",
                str(port_file),
                "--log-level",
                "warning",
                *args,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
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
