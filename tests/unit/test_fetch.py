"""SafeFetcher: the SSRF guard, pinning, redirects, caps and deadlines.

A real ThreadingHTTPServer on 127.0.0.1 serves the test responses; no test connects
anywhere but loopback, and internal-address refusals must happen before any connection.
"""

from __future__ import annotations

import ipaddress
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest

from blipserve.config import FetchConfig
from blipserve.errors import FetchError, UrlRefused
from blipserve.fetch import SafeFetcher
from blipserve.url_guard import internal_address_reason
from helpers import make_image, png_bytes

PNG = png_bytes(make_image(3))


class Handler(BaseHTTPRequestHandler):
    """Routes: /img.png, /echo-host, /redirect?to=, /chain/N, /big, /big-stream, /endless,
    /slow, /404."""

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes, length: int | None = None, **headers: str) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key.replace("_", "-"), value)
        if length is not None:
            self.send_header("Content-Length", str(length))
        self.end_headers()
        self.wfile.write(body)

    def _stream(self, chunk: bytes, count: int, delay: float = 0.0) -> None:
        # HTTP/1.0 without Content-Length: the body ends when the connection closes.
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.end_headers()
        try:
            for _ in range(count):
                self.wfile.write(chunk)
                self.wfile.flush()
                if delay:
                    time.sleep(delay)
        except OSError:  # the client hung up, as it should
            pass

    def do_GET(self) -> None:
        path, _, query = self.path.partition("?")
        if path == "/img.png":
            self._send(200, PNG, len(PNG), Content_Type="image/png")
        elif path == "/echo-host":
            host = self.headers.get("Host", "").encode()
            self._send(200, host, len(host))
        elif path == "/redirect":
            self._send(302, b"", 0, Location=unquote(query.removeprefix("to=")))
        elif path.startswith("/chain/"):
            n = int(path.rsplit("/", 1)[1])
            location = f"/chain/{n - 1}" if n > 0 else "/img.png"
            self._send(302, b"", 0, Location=location)
        elif path == "/relative":
            self._send(301, b"", 0, Location="img.png")
        elif path == "/big":
            self._send(200, b"x" * 100, 10_000_000)
        elif path == "/big-stream":
            self._stream(b"x" * 10_000, 20)
        elif path == "/endless":
            self._stream(b"x" * 65536, 10**9)
        elif path == "/slow":
            self._stream(b"x", 100, delay=0.2)
        else:
            self._send(404, b"not found", 9)


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    # socketserver's default backlog is 5: eight threads connecting at once on a busy
    # machine could find it full, and a dropped SYN is retried after 1 s, past the tests'
    # 1 s connect timeout (the cause of a rare failure of the threads test).
    request_queue_size = 64

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass


def _serve(server: QuietServer) -> Iterator[int]:
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    yield from _serve(QuietServer(("127.0.0.1", 0), Handler))


def fetcher(*allow: str, **overrides: Any) -> SafeFetcher:
    settings: dict[str, Any] = {"connect_timeout_s": 1.0, "read_timeout_s": 3.0}
    settings.update(overrides)
    return SafeFetcher(FetchConfig(allow_url_hosts=allow, **settings))


@pytest.fixture
def no_connect(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything tries to open a TCP connection."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"unexpected connection attempt to {args[0]!r}")

    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def fake_dns(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[list[str]]]:
    """Names in the returned dict resolve to their next answer (one list per lookup)."""
    answers: dict[str, list[list[str]]] = {}
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host not in answers:
            return real(host, port, *args, **kwargs)
        if not answers[host]:
            raise socket.gaierror(socket.EAI_NONAME, "resolved twice: DNS rebinding risk")
        result = []
        for ip in answers[host].pop(0):
            family = socket.AF_INET6 if ":" in ip else socket.AF_INET
            sockaddr = (ip, port, 0, 0) if ":" in ip else (ip, port)
            result.append((family, socket.SOCK_STREAM, 6, "", sockaddr))
        return result

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return answers


# --- refusals -------------------------------------------------------------------------

INTERNAL_URLS = [
    "http://127.0.0.1/",
    "http://127.1/",
    "http://2130706433/",
    "http://0x7f000001/",
    "http://0177.0.0.1/",
    "http://127.255.255.254:8080/x.png",
    "http://0.0.0.0/",
    "http://0/",
    "http://[::1]/",
    "http://[::]/",
    "http://[::ffff:127.0.0.1]/",
    "http://[::ffff:7f00:1]/",
    "http://[::ffff:169.254.169.254]/",
    "http://[::127.0.0.1]/",
    "http://[2002:7f00:1::]/",
    "http://[64:ff9b::a9fe:a9fe]/",
    "http://169.254.169.254/latest/meta-data/",
    "http://10.0.0.1/",
    "http://10.255.255.255/",
    "http://172.16.0.1/",
    "http://172.31.255.254/",
    "http://192.168.0.1/",
    "http://192.168.255.255/",
    "http://100.64.0.1/",
    "http://100.127.255.254/",
    "http://[fc00::1]/",
    "http://[fd12:3456::1]/",
    "http://[fe80::1]/",
    "http://224.0.0.1/",
    "http://255.255.255.255/",
    "http://240.0.0.1/",
    "http://localhost/",
    "http://LOCALHOST./img.png",
    "https://127.0.0.1:8443/",
    "https://localhost/",
]


@pytest.mark.usefixtures("no_connect")
@pytest.mark.parametrize("url", INTERNAL_URLS)
def test_internal_addresses_refused_without_connecting(url: str) -> None:
    with pytest.raises(UrlRefused, match=r"URL refused: host '.*' resolves to (a|an|not) "):
        fetcher().fetch(url)


@pytest.mark.usefixtures("no_connect")
@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("file:///etc/passwd", "scheme 'file' is not allowed"),
        ("ftp://example.com/x.png", "scheme 'ftp'"),
        ("gopher://example.com/", "scheme 'gopher'"),
        ("data:image/png;base64,iVBORw0KGgo=", "scheme 'data'"),
        ("javascript:alert(1)", "scheme 'javascript'"),
        ("//example.com/x.png", "scheme ''"),
        ("http://user:pass@example.com/x.png", "credentials"),
        ("http://user@127.0.0.1/", "credentials"),
        ("https://:@example.com/", "credentials"),
        ("http:///x.png", "no host"),
        ("http://example.com:99999/", "malformed URL"),
        ("http://[fe80::1%25eth0]/", "zone"),
    ],
)
def test_bad_urls_refused(url: str, message: str) -> None:
    with pytest.raises(UrlRefused, match=message):
        fetcher().fetch(url)


def test_refusal_message_names_host_and_address() -> None:
    with pytest.raises(UrlRefused) as info:
        fetcher().fetch("http://127.1/x.png")
    assert str(info.value) == "URL refused: host '127.1' resolves to a loopback address"


@pytest.mark.usefixtures("no_connect")
def test_allow_urls_off_refuses_everything() -> None:
    with pytest.raises(UrlRefused, match="not accepted"):
        fetcher("127.0.0.1", allow_urls=False).fetch("http://127.0.0.1/img.png")


@pytest.mark.usefixtures("no_connect")
def test_any_internal_answer_refuses_the_host(fake_dns: dict[str, list[list[str]]]) -> None:
    fake_dns["mixed.test"] = [["8.8.8.8", "10.1.2.3"]]
    with pytest.raises(UrlRefused, match=r"'mixed\.test' resolves to a private address") as info:
        fetcher().fetch("http://mixed.test/img.png")
    assert "10.1.2.3" not in str(info.value)  # the inside's addresses are not told to clients


def test_hung_dns_lookup_is_cut_at_connect_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    real = socket.getaddrinfo

    def slow(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "slow.test":
            time.sleep(1.0)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", slow)
    start = time.monotonic()
    with pytest.raises(FetchError, match=r"timed out resolving host 'slow\.test'"):
        fetcher(connect_timeout_s=0.2).fetch("http://slow.test/img.png")
    assert time.monotonic() - start < 0.8


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("8.8.8.8", None),
        ("2606:4700:4700::1111", None),
        ("::ffff:8.8.8.8", None),
        ("127.0.0.1", "a loopback address"),
        ("100.64.0.1", "a shared (CGNAT) address"),
        ("169.254.169.254", "a link-local address"),
        ("::ffff:10.0.0.1", "a private address (embedded 10.0.0.1)"),
        ("2002:a9fe:a9fe::1", "a link-local address (embedded 169.254.169.254)"),
        ("192.0.2.1", "a private address"),  # documentation range
        ("fec0::1", "a site-local address"),
    ],
)
def test_internal_address_reason(address: str, reason: str | None) -> None:
    assert internal_address_reason(ipaddress.ip_address(address)) == reason


def test_bad_allow_list_entry_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="allow_url_hosts"):
        fetcher("127.0.0.1:http")


# --- served over loopback ------------------------------------------------------------


def test_loopback_refused_by_default(port: int) -> None:
    with pytest.raises(UrlRefused, match=r"host .127\.0\.0\.1. resolves to a loopback address"):
        fetcher().fetch(f"http://127.0.0.1:{port}/img.png")


@pytest.mark.parametrize(
    "entry", ["127.0.0.1", "127.0.0.1:{port}", "LOCALHOST", "localhost:{port}"]
)
def test_allow_listed_host_is_served(port: int, entry: str) -> None:
    host = "localhost" if "localhost" in entry.lower() else "127.0.0.1"
    assert fetcher(entry.format(port=port)).fetch(f"http://{host}:{port}/img.png") == PNG


def test_allow_list_port_must_match(port: int) -> None:
    with pytest.raises(UrlRefused, match="loopback"):
        fetcher(f"127.0.0.1:{port + 1}").fetch(f"http://127.0.0.1:{port}/img.png")


def test_allow_list_matches_the_literal_host_only(port: int) -> None:
    # 127.1 is 127.0.0.1, but the allow-list names hosts, not what they resolve to.
    with pytest.raises(UrlRefused):
        fetcher("127.0.0.1").fetch(f"http://127.1:{port}/img.png")


def test_connection_is_pinned_to_the_vetted_address(
    port: int, fake_dns: dict[str, list[list[str]]]
) -> None:
    # One answer only: a second lookup (a re-resolve at connect time) would fail.
    fake_dns["images.test"] = [["127.0.0.1"]]
    body = fetcher("images.test").fetch(f"http://images.test:{port}/echo-host")
    assert body == f"images.test:{port}".encode()  # Host header keeps the name


def test_redirects_followed(port: int) -> None:
    f = fetcher("127.0.0.1", max_redirects=3)
    assert f.fetch(f"http://127.0.0.1:{port}/chain/2") == PNG  # 3 redirects
    assert f.fetch(f"http://127.0.0.1:{port}/relative") == PNG


def test_too_many_redirects(port: int) -> None:
    with pytest.raises(FetchError, match=r"too many redirects .*more than 2"):
        fetcher("127.0.0.1", max_redirects=2).fetch(f"http://127.0.0.1:{port}/chain/3")


def test_no_redirects_allowed(port: int) -> None:
    with pytest.raises(FetchError, match="too many redirects"):
        fetcher("127.0.0.1", max_redirects=0).fetch(f"http://127.0.0.1:{port}/chain/0")


@pytest.mark.parametrize(
    ("location", "message"),
    [
        ("http://127.0.0.2:{port}/img.png", "'127.0.0.2' resolves to a loopback"),
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://localhost:{port}/img.png", "loopback"),
        ("file:///etc/passwd", "scheme 'file'"),
        ("http://user:pw@127.0.0.1:{port}/img.png", "credentials"),
    ],
)
def test_redirect_to_refused_url_is_refused(
    port: int, location: str, message: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The error names the URL given, not the redirect's target (from a Location header
    the client never saw); the target and why it was refused go to the log."""
    target = location.format(port=port)
    url = f"http://127.0.0.1:{port}/redirect?to={target}"
    with pytest.raises(UrlRefused) as refused:
        fetcher("127.0.0.1").fetch(url)
    assert refused.value.message == (
        f"URL refused: {url} redirected to a URL that is not allowed; the redirect was "
        "refused (its target is in the server's log)"
    )
    [logged] = [r.getMessage() for r in caplog.records if r.name == "blipserve.fetch"]
    assert f"refused redirect 1 of {url}, to {target}: URL refused: " in logged
    assert message in logged


def test_http_error_status(port: int) -> None:
    with pytest.raises(FetchError, match="HTTP 404"):
        fetcher("127.0.0.1").fetch(f"http://127.0.0.1:{port}/missing")


def test_content_length_over_cap_refused_early(port: int) -> None:
    with pytest.raises(FetchError, match=r"10000000 bytes, more than the 50000 byte limit"):
        fetcher("127.0.0.1", max_fetch_bytes=50_000).fetch(f"http://127.0.0.1:{port}/big")


def test_streamed_body_over_cap_refused(port: int) -> None:
    with pytest.raises(FetchError, match="larger than the 50000 byte limit"):
        fetcher("127.0.0.1", max_fetch_bytes=50_000).fetch(f"http://127.0.0.1:{port}/big-stream")


def test_endless_body_cut_at_cap(port: int) -> None:
    start = time.monotonic()
    with pytest.raises(FetchError, match="larger than the 1000000 byte limit"):
        fetcher("127.0.0.1", max_fetch_bytes=1_000_000).fetch(f"http://127.0.0.1:{port}/endless")
    assert time.monotonic() - start < 2


def test_slow_drip_cut_at_read_deadline(port: int) -> None:
    start = time.monotonic()
    with pytest.raises(FetchError, match=r"took longer than 1.0s \(read_timeout_s\)"):
        fetcher("127.0.0.1", read_timeout_s=1.0).fetch(f"http://127.0.0.1:{port}/slow")
    assert 0.9 < time.monotonic() - start < 2


def test_connection_refused_is_a_fetch_error() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        free_port = sock.getsockname()[1]
    with pytest.raises(FetchError, match="could not fetch") as info:
        fetcher("127.0.0.1").fetch(f"http://127.0.0.1:{free_port}/img.png")
    assert not isinstance(info.value, UrlRefused)


def test_fetcher_is_usable_from_threads(port: int) -> None:
    f = fetcher("127.0.0.1")
    results: list[bytes] = []

    def work() -> None:
        results.append(f.fetch(f"http://127.0.0.1:{port}/img.png"))

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [PNG] * 8


# --- https: SNI and certificate checks use the host name, not the pinned IP -----------


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path, list[str]]]:
    """An https server with a self-signed certificate for 'localhost' (needs openssl)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            *(openssl, "req", "-x509", "-nodes", "-days", "1", "-subj", "/CN=localhost"),
            *("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
            *("-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    sni_seen: list[str] = []
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    context.sni_callback = lambda sock, name, ctx: sni_seen.append(str(name))
    server = QuietServer(("127.0.0.1", 0), Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    for port in _serve(server):
        yield port, cert, sni_seen


def test_https_certificate_is_verified(tls: tuple[int, Path, list[str]]) -> None:
    port, _, _ = tls
    with pytest.raises(FetchError, match="CERTIFICATE_VERIFY_FAILED"):
        fetcher("localhost").fetch(f"https://localhost:{port}/img.png")


def test_https_uses_host_name_for_sni_and_verification(tls: tuple[int, Path, list[str]]) -> None:
    port, cert, sni_seen = tls
    trusting = ssl.create_default_context(cafile=str(cert))
    f = SafeFetcher(
        FetchConfig(allow_url_hosts=("localhost", "127.0.0.1"), read_timeout_s=3.0),
        ssl_context=trusting,
    )
    assert f.fetch(f"https://localhost:{port}/img.png") == PNG
    assert sni_seen[-1] == "localhost"
    # Same server, same pinned IP, but the URL names the IP: the certificate does not match.
    with pytest.raises(FetchError, match=r"IP address mismatch|CERTIFICATE_VERIFY_FAILED"):
        f.fetch(f"https://127.0.0.1:{port}/img.png")
