"""SSRF through the real server: every internal address form is refused, by the guard,
before any connection; slow-drip and endless downloads are cut at the deadline and the cap.

Two loopback HTTP servers stand in for the world: ``public`` (allow-listed with
``--allow-url-host 127.0.0.1:PORT``, as an image CDN would be) and ``secret`` (an internal
service, not allow-listed). ``secret`` counts its requests: whatever URL form a row uses,
and whatever a redirect from ``public`` points at, it must never be reached.
Fetcher-level tests of the same guard (and of names that resolve inside) are in
tests/unit/test_fetch.py and below.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar, cast
from urllib.parse import unquote

import httpx
import pytest

from blipserve.config import FetchConfig
from blipserve.errors import UrlRefused
from blipserve.fetch import SafeFetcher
from helpers import make_image, png_bytes
from testkit.live_server import RunningServer

PNG = png_bytes(make_image(8))
READ_TIMEOUT_S = 2.0
FETCH_CAP = 1_000_000


class Handler(BaseHTTPRequestHandler):
    """/img.png, /redirect?to=URL, /slow (a byte every 0.2 s), /endless (never ends)."""

    hits: ClassVar[dict[int, int]] = {}

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        port = cast(tuple[str, int], self.server.server_address)[1]
        self.hits[port] = self.hits.get(port, 0) + 1
        path, _, query = self.path.partition("?")
        if path == "/redirect":
            self.send_response(302)
            self.send_header("Location", unquote(query.removeprefix("to=")))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        if path == "/img.png":
            self.send_header("Content-Length", str(len(PNG)))
            self.end_headers()
            self.wfile.write(PNG)
            return
        self.end_headers()  # no length: the body ends when the connection closes
        chunk, delay = (b"\x89", 0.2) if path == "/slow" else (b"\0" * 65536, 0.0)
        try:
            for _ in range(10**6):
                self.wfile.write(chunk)
                self.wfile.flush()
                time.sleep(delay)
        except OSError:  # the fetcher hung up, as it should
            pass


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass


@pytest.fixture(scope="module")
def hosts() -> Iterator[dict[str, int]]:
    servers = {name: QuietServer(("127.0.0.1", 0), Handler) for name in ("public", "secret")}
    for s in servers.values():
        serve = threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.05})
        serve.daemon = True
        serve.start()
    yield {name: s.server_address[1] for name, s in servers.items()}
    for s in servers.values():
        s.shutdown()
        s.server_close()


@pytest.fixture(scope="module")
def server(
    server_factory: Callable[..., RunningServer], controllable_model: Path, hosts: dict[str, int]
) -> RunningServer:
    return server_factory(
        controllable_model,
        "--allow-url-host",
        f"127.0.0.1:{hosts['public']}",
        "--read-timeout-s",
        str(READ_TIMEOUT_S),
        "--connect-timeout-s",
        "1",
        "--max-fetch-bytes",
        str(FETCH_CAP),
        "--max-wait-ms",
        "0",
    )


def score_url(server: RunningServer, url: str) -> httpx.Response:
    body = {"input_data": {"columns": ["image"], "data": [[url]]}, "params": {"max_new_tokens": 3}}
    return httpx.post(f"{server.url}/score", json=body, timeout=60)


# {secret} is the internal service's port: reachable, if the guard let the URL through.
INTERNAL = [
    "http://127.0.0.1:{secret}/img.png",
    "http://127.1:{secret}/img.png",
    "http://127.0.1:{secret}/img.png",
    "http://2130706433:{secret}/img.png",
    "http://0x7f000001:{secret}/img.png",
    "http://0x7f.1:{secret}/img.png",
    "http://0177.0.0.1:{secret}/img.png",
    "http://017700000001:{secret}/img.png",
    "http://127.000.000.001:{secret}/img.png",
    "http://0.0.0.0:{secret}/img.png",  # Linux connects 0.0.0.0 to the local host
    "http://0:{secret}/img.png",
    "http://localhost:{secret}/img.png",  # a host name that resolves to loopback
    "http://LocalHost.:{secret}/img.png",
    "http://[::1]:{secret}/img.png",
    "http://[::]:{secret}/img.png",
    "http://[::ffff:127.0.0.1]:{secret}/img.png",
    "http://[0:0:0:0:0:ffff:7f00:1]:{secret}/img.png",
    "http://[::127.0.0.1]:{secret}/img.png",
    "http://[2002:7f00:1::]:{secret}/img.png",  # 6to4 of 127.0.0.1
    "http://[64:ff9b::7f00:1]:{secret}/img.png",  # NAT64 of 127.0.0.1
    "http://169.254.169.254/latest/meta-data/",
    "http://[::ffff:169.254.169.254]/latest/meta-data/",
    "http://[fd00:ec2::254]/latest/meta-data/",
    "http://10.0.0.1/",
    "http://10.255.255.255/",
    "http://172.16.0.1/",
    "http://172.31.255.255/",
    "http://192.168.0.1/",
    "http://192.168.255.255/",
    "http://100.64.0.1/",
    "http://100.127.255.255/",
    "http://[fc00::1]/",
    "http://[fdff:ffff::1]/",
    "http://[fe80::1]/",
    "http://[febf:ffff::1]/",
    "https://127.0.0.1:{secret}/img.png",
]
OTHER_REFUSALS = [
    ("file:///etc/passwd", "scheme 'file'"),
    ("ftp://127.0.0.1:{public}/img.png", "scheme 'ftp'"),
    ("gopher://127.0.0.1:{public}/_GET", "scheme 'gopher'"),
    ("dict://127.0.0.1:{secret}/", "scheme 'dict'"),
    ("http://user:pass@127.0.0.1:{public}/img.png", "credentials"),
    ("http://user@127.0.0.1:{public}/img.png", "credentials"),
    ("http://127.0.0.1:{public}@127.0.0.1:{secret}/img.png", "credentials"),
]
# Where the allow-listed host redirects to (into the inside, other schemes, credentials).
REFUSED_REDIRECTS = [
    "http://127.0.0.1:{secret}/img.png",
    "http://localhost:{secret}/img.png",
    "http://[::ffff:7f00:1]:{secret}/img.png",
    "http://169.254.169.254/latest/meta-data/",
    "http://10.0.0.1/",
    "file:///etc/passwd",
    "gopher://127.0.0.1:{secret}/",
    "http://a%3Ab%40127.0.0.1/img.png",
]


def test_allow_listed_host_is_fetched(server: RunningServer, hosts: dict[str, int]) -> None:
    response = score_url(server, f"http://127.0.0.1:{hosts['public']}/img.png")
    assert response.status_code == 200, response.text
    redirected = score_url(
        server,
        f"http://127.0.0.1:{hosts['public']}/redirect?to=/img.png",  # same host: fine
    )
    assert redirected.json() == response.json()


@pytest.mark.parametrize("template", INTERNAL)
def test_internal_address_refused(
    server: RunningServer, hosts: dict[str, int], template: str
) -> None:
    secret_hits = Handler.hits.get(hosts["secret"], 0)
    response = score_url(server, template.format(**hosts))
    assert response.status_code == 400, response.text
    message = response.json()["message"]
    assert message.startswith("row 0: URL refused: host "), message
    assert " resolves to " in message
    assert Handler.hits.get(hosts["secret"], 0) == secret_hits  # never connected


@pytest.mark.parametrize(("template", "reason"), OTHER_REFUSALS)
def test_other_schemes_and_credentials_refused(
    server: RunningServer, hosts: dict[str, int], template: str, reason: str
) -> None:
    response = score_url(server, template.format(**hosts))
    assert response.status_code == 400, response.text
    message = response.json()["message"]
    assert message.startswith("row 0: URL refused: "), message
    assert reason in message
    assert Handler.hits.get(hosts["secret"], 0) == 0


@pytest.mark.parametrize("location", REFUSED_REDIRECTS)
def test_refused_redirect_is_told_without_its_target(
    server: RunningServer, hosts: dict[str, int], location: str
) -> None:
    url = f"http://127.0.0.1:{hosts['public']}/redirect?to={location.format(**hosts)}"
    secret_hits = Handler.hits.get(hosts["secret"], 0)
    response = score_url(server, url)
    assert response.status_code == 400, response.text
    # The client learns that the redirect was refused, not where it led: the target came
    # from a Location header it never saw (here the URL it sent spells it, in its query).
    assert response.json()["message"] == (
        f"row 0: URL refused: {url} redirected to a URL that is not allowed; the redirect "
        "was refused (its target is in the server's log)"
    )
    assert f"to {unquote(location.format(**hosts))}: URL refused: " in server.output()
    assert Handler.hits.get(hosts["secret"], 0) == secret_hits  # never connected


@pytest.mark.parametrize(
    ("path", "reason", "at_most_s"),
    [
        ("/slow", f"took longer than {READ_TIMEOUT_S}s (read_timeout_s)", READ_TIMEOUT_S + 2),
        ("/endless", f"larger than the {FETCH_CAP} byte limit (max_fetch_bytes)", 3),
    ],
)
def test_slow_and_endless_downloads_are_cut(
    server: RunningServer, hosts: dict[str, int], path: str, reason: str, at_most_s: float
) -> None:
    started = time.monotonic()
    response = score_url(server, f"http://127.0.0.1:{hosts['public']}{path}")
    elapsed = time.monotonic() - started
    assert response.status_code == 400, response.text
    assert response.json()["message"].startswith("row 0: ")
    assert reason in response.json()["message"]
    assert elapsed < at_most_s
    assert score_url(server, f"http://127.0.0.1:{hosts['public']}/img.png").status_code == 200


# --- the fetcher alone: host names whose DNS answer is inside ------------------------


@pytest.fixture
def fake_dns(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """Names in the returned dict resolve to its addresses; connecting fails the test."""
    answers: dict[str, list[str]] = {}
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host not in answers:
            return real(host, port, *args, **kwargs)
        return [
            (socket.AF_INET6, socket.SOCK_STREAM, 6, "", (ip, port, 0, 0))
            if ":" in ip
            else (socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))
            for ip in answers[host]
        ]

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"unexpected connection attempt to {args[0]!r}")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return answers


@pytest.mark.parametrize(
    ("answers", "reason"),
    [
        (["127.0.0.1"], "a loopback address"),
        (["127.53.0.9"], "a loopback address"),
        (["::1"], "a loopback address"),
        (["0.0.0.0"], "an unspecified address"),
        (["169.254.169.254"], "a link-local address"),
        (["10.1.2.3"], "a private address"),
        (["172.20.0.1"], "a private address"),
        (["192.168.1.1"], "a private address"),
        (["100.100.100.200"], "a shared (CGNAT) address"),  # Alibaba's metadata service
        (["fd00::1"], "a private address"),
        (["fe80::1"], "a link-local address"),
        (["::ffff:127.0.0.1"], "a loopback address (embedded 127.0.0.1)"),
        (["93.184.215.14", "127.0.0.1"], "a loopback address"),  # one bad answer is enough
    ],
)
def test_names_resolving_inside_are_refused(
    fake_dns: dict[str, list[str]], answers: list[str], reason: str
) -> None:
    fake_dns["images.example"] = answers
    fetcher = SafeFetcher(FetchConfig(connect_timeout_s=1.0, read_timeout_s=2.0))
    expected = r"host 'images\.example' resolves to " + re.escape(reason.split(" (embedded")[0])
    with pytest.raises(UrlRefused, match=expected):
        fetcher.fetch("http://images.example/cat.png")
