"""Download image URLs: the connection pinned to the guard's addresses, one deadline, a cap.

Each hop's URL is first vetted by :class:`~blipserve.url_guard.UrlGuard` (the SSRF guard),
which resolves the host once; the download then connects to exactly those addresses.

Why httpcore: it is the engine under httpx (a hard dependency of httpx 0.28) and its public
:class:`httpcore.NetworkBackend` hook lets us replace the one place a hostname becomes a
socket.  The URL keeps the real hostname, so the ``Host`` header, TLS SNI and certificate
verification all use the name, while the TCP connection goes to the pinned IP.  The same
hook wraps every socket read/write with one deadline for the whole fetch, so a server
dripping a byte a second is cut at ``read_timeout_s`` (httpx's own read timeout is per
read and would never fire).  A fresh pool is made per hop, so nothing is shared between
threads except the (thread-safe) SSL context.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import urljoin

import httpcore
import httpx

from blipserve.config import FetchConfig
from blipserve.errors import FetchError, UrlRefused
from blipserve.url_guard import FetchTarget, UrlGuard, short_url

_REDIRECTS = frozenset({301, 302, 303, 307, 308})

log = logging.getLogger(__name__)


class _DeadlineStream(httpcore.NetworkStream):
    """A socket stream whose every operation is bounded by one absolute deadline."""

    def __init__(self, inner: httpcore.NetworkStream, deadline: float) -> None:
        self._inner = inner
        self._deadline = deadline

    def _timeout(self, timeout: float | None, exc: type[Exception]) -> float:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise exc("deadline for the whole download passed")
        return remaining if timeout is None else min(timeout, remaining)

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, self._timeout(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, self._timeout(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        # server_hostname is the URL's host name: SNI and certificate checks use it.
        tls = self._inner.start_tls(
            ssl_context, server_hostname, self._timeout(timeout, httpcore.ConnectTimeout)
        )
        return _DeadlineStream(tls, self._deadline)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _PinnedBackend(httpcore.NetworkBackend):
    """Connects to the vetted IPs of one host, never re-resolving the name."""

    def __init__(self, target: FetchTarget, connect_timeout: float, deadline: float) -> None:
        self._target = target
        self._connect_timeout = connect_timeout
        self._deadline = deadline
        self._inner = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        if host != self._target.host or port != self._target.port:
            # Only the vetted origin may be connected to (defensive: httpcore has no reason
            # to ask for another one, since we never use proxies or follow redirects in it).
            raise httpcore.ConnectError(f"unexpected connection to {host}:{port}")
        error: Exception = httpcore.ConnectError(f"no address to connect to for {host!r}")
        for ip in self._target.addresses:
            remaining = self._deadline - time.monotonic()
            if remaining <= 0:
                raise httpcore.ConnectTimeout("deadline for the whole download passed")
            try:
                stream = self._inner.connect_tcp(
                    ip,
                    port,
                    timeout=min(self._connect_timeout, remaining),
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                error = exc  # try the next vetted address, like socket.create_connection
                continue
            return _DeadlineStream(stream, self._deadline)
        raise error

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("unix sockets are never used for image URLs")

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class SafeFetcher:
    """Downloads image URLs under :class:`FetchConfig`; safe to share between threads."""

    def __init__(
        self, config: FetchConfig | None = None, *, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        """``ssl_context`` replaces the default verifying one (e.g. to trust a private CA)."""
        self.config = config if config is not None else FetchConfig()
        self.guard = UrlGuard(self.config)
        # Verifying context with certifi's CA bundle (httpx's default); an SSLContext may be
        # shared by threads for wrapping sockets.
        self._ssl_context = ssl_context if ssl_context is not None else httpx.create_ssl_context()

    def fetch(self, url: str) -> bytes:
        """GET ``url`` (following vetted redirects) and return the body bytes."""
        cfg = self.config
        deadline = time.monotonic() + cfg.read_timeout_s
        current = url
        for hop in range(cfg.max_redirects + 1):
            remaining = max(deadline - time.monotonic(), 0.001)
            try:
                target = self.guard.check(current, timeout=min(cfg.connect_timeout_s, remaining))
            except UrlRefused as exc:
                if hop == 0:
                    raise
                # The target came from a Location header the client never saw: naming it
                # (or what it resolves to) would show the client around the inside.
                log.warning(
                    "refused redirect %d of %s, to %s: %s",
                    hop,
                    short_url(url),
                    short_url(current),
                    exc.message,
                )
                raise UrlRefused(
                    f"URL refused: {short_url(url)} redirected to a URL that is not allowed; "
                    "the redirect was refused (its target is in the server's log)"
                ) from None
            body, location = self._get(target, deadline)
            if location is None:
                return body
            current = urljoin(current, location)  # checked on the next hop
        raise FetchError(
            f"too many redirects fetching {short_url(url)} (more than {cfg.max_redirects}; "
            "max_redirects)"
        )

    def _get(self, target: FetchTarget, deadline: float) -> tuple[bytes, str | None]:
        """One request to a vetted target: (body, None) or (b"", redirect location)."""
        cfg = self.config
        url = short_url(target.url)
        backend = _PinnedBackend(target, cfg.connect_timeout_s, deadline)
        request_url = httpcore.URL(
            scheme=target.scheme.encode(),
            host=target.host.encode("ascii"),
            port=target.port,
            target=target.target.encode("ascii"),
        )
        headers: Sequence[tuple[bytes, bytes]] = [
            (b"Host", target.host_header.encode("ascii")),
            (b"User-Agent", b"blipserve"),
            (b"Accept", b"image/*, */*;q=0.5"),
            # Compressed transfer encodings would let a small response inflate past the cap.
            (b"Accept-Encoding", b"identity"),
        ]
        remaining = max(deadline - time.monotonic(), 0.001)
        timeouts = {
            "connect": min(cfg.connect_timeout_s, remaining),
            "read": remaining,
            "write": remaining,
            "pool": remaining,
        }
        try:
            with (
                httpcore.ConnectionPool(
                    ssl_context=self._ssl_context,
                    max_connections=1,
                    http1=True,
                    http2=False,
                    retries=0,
                    network_backend=backend,
                ) as pool,
                pool.stream(
                    "GET", request_url, headers=headers, extensions={"timeout": timeouts}
                ) as response,
            ):
                status = response.status
                if status in _REDIRECTS:
                    location = _header(response.headers, b"location")
                    if not location:
                        raise FetchError(f"{url} redirected (HTTP {status}) without a Location")
                    return b"", location
                if status >= 400:
                    raise FetchError(f"fetching {url} failed: HTTP {status}")
                if not 200 <= status < 300:
                    raise FetchError(f"fetching {url} gave unexpected HTTP {status}")
                return self._read_body(response, url), None
        except httpcore.ConnectTimeout:
            raise FetchError(
                f"timed out connecting to {target.host!r} for {url} "
                f"(connect_timeout_s={cfg.connect_timeout_s})"
            ) from None
        except httpcore.TimeoutException:
            raise FetchError(
                f"fetching {url} took longer than {cfg.read_timeout_s}s (read_timeout_s)"
            ) from None
        except (httpcore.NetworkError, httpcore.ProtocolError, httpcore.UnsupportedProtocol) as e:
            detail = str(e) or type(e).__name__
            raise FetchError(f"could not fetch {url}: {detail}") from None

    def _read_body(self, response: httpcore.Response, url: str) -> bytes:
        """Read the body, refusing it as soon as it is known to exceed the cap."""
        cap = self.config.max_fetch_bytes
        length = _header(response.headers, b"content-length")
        if length is not None and length.strip().isdigit() and int(length) > cap:
            raise FetchError(
                f"{url} is {int(length)} bytes, more than the {cap} byte limit (max_fetch_bytes)"
            )
        chunks: list[bytes] = []
        size = 0
        for chunk in response.iter_stream():
            size += len(chunk)
            if size > cap:
                raise FetchError(
                    f"{url} is larger than the {cap} byte limit (max_fetch_bytes); download stopped"
                )
            chunks.append(chunk)
        return b"".join(chunks)


def _header(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> str | None:
    for key, value in headers:
        if key.lower() == name:
            return value.decode("latin-1")
    return None
