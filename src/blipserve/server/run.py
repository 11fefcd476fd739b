"""Running the app under uvicorn: ``blipserve serve``."""

from __future__ import annotations

import signal
import socket
from pathlib import Path
from types import FrameType

import uvicorn

from blipserve.config import Settings
from blipserve.server import logs
from blipserve.server.app import ServerState, create_app


class PortFileServer(uvicorn.Server):
    """uvicorn's server, writing the bound port to a file once listening (for --port 0),
    and exiting 0 on SIGTERM once in-flight requests are done.

    ``bench/baseline_server.py`` runs under it too, so a benchmark starts and stops both
    servers the same way.
    """

    def __init__(self, config: uvicorn.Config, port_file: str | None) -> None:
        super().__init__(config)
        self.port_file = port_file

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        captured = getattr(self, "_captured_signals", None)
        if sig == signal.SIGTERM and isinstance(captured, list) and sig in captured:
            # SIGTERM is an orchestrator's normal "stop": once in-flight requests are done
            # we exit 0, where uvicorn would re-raise it and die by the signal.
            captured.remove(sig)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.port_file and self.servers:
            port = self.servers[0].sockets[0].getsockname()[1]
            tmp = Path(self.port_file + ".tmp")
            tmp.write_text(f"{port}\n")
            tmp.replace(self.port_file)  # atomic: a reader never sees a partial file


def serve(settings: Settings, *, port_file: str | None = None) -> int:
    """Run the server until SIGINT/SIGTERM (in-flight requests finish); the exit code."""
    server = settings.server
    json_logs = server.log_format == "json"
    if json_logs:  # every logger, uvicorn's too, as JSON lines (blipserve.server.logs)
        logs.configure_json(server.log_level)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=server.host,
        port=server.port,
        log_level=server.log_level,
        log_config=None if json_logs else uvicorn.config.LOGGING_CONFIG,
        timeout_graceful_shutdown=int(server.graceful_timeout_s),
        access_log=False,  # blipserve.access logs each request (with its id)
    )
    runner = PortFileServer(config, port_file)
    state: ServerState = app.state.blipserve

    def stop() -> None:
        runner.should_exit = True

    state.on_load_failure = stop
    runner.run()
    return 1 if state.load_error else 0
