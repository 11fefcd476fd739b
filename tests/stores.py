"""Object-store emulators that speak the real protocols, started by the tests on loopback.

- Azure Blob: Azurite (npm package, installed by scripts/install_azurite.sh into
  .tools/azurite), with ``--disableTelemetry`` so it never reaches outside this machine;
  its data lives in a folder, so a stopped and restarted Azurite keeps it.
- S3: moto's standalone server (``moto[server]``); in memory.

Each :class:`Emulator` knows how a user would reach it: the storage options, and the
environment variables a ``blipserve batch`` process would read credentials from.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
AZURITE = ROOT / ".tools" / "azurite" / "node_modules" / ".bin" / "azurite-blob"
# Azurite's well-known development account (public: it is in Microsoft's documentation).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Emulator:
    kind: str  # "azure" or "s3"
    port: int
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.workdir / f"{self.kind}.log"

    # -- how a user reaches it ---------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def scheme(self) -> str:
        return "az" if self.kind == "azure" else "s3"

    @property
    def connection_string(self) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};"
            f"AccountKey={AZURITE_KEY};BlobEndpoint={self.endpoint}/{AZURITE_ACCOUNT};"
        )

    @property
    def storage_options(self) -> dict[str, Any]:
        if self.kind == "azure":
            return {"connection_string": self.connection_string}
        return {"endpoint_url": self.endpoint, "key": "testing", "secret": "testing"}

    @property
    def env(self) -> dict[str, str]:
        """Credentials as environment variables, the way adlfs / s3fs (botocore) read them."""
        if self.kind == "azure":
            return {"AZURE_STORAGE_CONNECTION_STRING": self.connection_string}
        return {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL_S3": self.endpoint,
        }

    @property
    def secret(self) -> str:
        """Text that must never appear in a message or a log."""
        return AZURITE_KEY if self.kind == "azure" else "testing"

    def filesystem(self) -> Any:
        import fsspec

        # skip_instance_cache: a restarted emulator must not meet a cached, dead client
        return fsspec.filesystem(self.scheme, skip_instance_cache=True, **self.storage_options)

    def new_bucket(self) -> str:
        """A fresh container / bucket; returns its URL (``az://c-...``)."""
        name = f"t{uuid.uuid4().hex[:12]}"
        self.filesystem().mkdir(name)
        return f"{self.scheme}://{name}"

    def upload(self, url: str, files: dict[str, bytes]) -> None:
        """Put ``files`` (relative name -> bytes) under ``url``."""
        fs = self.filesystem()
        root = url.split("://", 1)[1]
        for name, data in files.items():
            fs.pipe_file(f"{root}/{name}", data)

    def download(self, url: str) -> bytes:
        return bytes(self.filesystem().cat_file(url.split("://", 1)[1]))

    # -- life -------------------------------------------------------------------------------

    def start(self) -> None:
        if self.kind == "azure":
            data = self.workdir / "azurite-data"
            data.mkdir(exist_ok=True)
            argv = [
                str(AZURITE),
                *("--blobHost", "127.0.0.1", "--blobPort", str(self.port)),
                *("--location", str(data), "--disableTelemetry", "--silent"),
                *("--skipApiVersionCheck", "--loose"),
            ]
        else:
            server = Path(sys.executable).with_name("moto_server")
            argv = [str(server), "-H", "127.0.0.1", "-p", str(self.port)]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} emulator exited: {self.log.read_text()[-2000:]}")
            try:
                httpx.get(self.endpoint, timeout=2)
                return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{self.kind} emulator not ready in 60 s")

    def stop(self, *, crash: bool = False) -> None:
        """Stop the server (``crash``: SIGKILL, at once, as a failing store would go)."""
        if self.proc is not None and self.proc.poll() is None:
            if crash:
                self.proc.kill()
            else:
                self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None


def available(kind: str) -> str | None:
    """Why the emulator cannot run here (None: it can)."""
    if kind == "azure":
        if not AZURITE.exists():
            return "Azurite is not installed (scripts/install_azurite.sh)"
        if shutil.which("node") is None:
            return "no node to run Azurite"
        return None
    if not Path(sys.executable).with_name("moto_server").exists():
        return "moto[server] is not installed"
    return None


def start_emulator(kind: str, workdir: Path) -> Emulator:
    emulator = Emulator(kind, free_port(), workdir)
    emulator.start()
    return emulator


__all__ = ["Emulator", "available", "free_port", "start_emulator"]
