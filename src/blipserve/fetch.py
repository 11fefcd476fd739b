"""Fetch image URLs safely: a guard against server-side request forgery (SSRF).

Every hop (the URL and each redirect) goes through the same guard: http(s) only, no
credentials, and the host is resolved once and refused when any of its addresses is
internal (loopback, private, link-local, ...), unless the host is allow-listed.  The
connection is then made to exactly the vetted addresses, so a DNS answer that changes
between the check and the connect (DNS rebinding) cannot redirect us inside.

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

import ipaddress
import logging
import socket
import ssl
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

import httpcore
import httpx

from blipserve.config import FetchConfig
from blipserve.errors import FetchError, UrlRefused

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_DEFAULT_PORTS = {"http": 80, "https": 443}
_SHARED_V4 = ipaddress.IPv4Network("100.64.0.0/10")  # carrier-grade NAT, RFC 6598
_NAT64 = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("64:ff9b:1::/48"))
_V4_COMPAT = ipaddress.IPv6Network("::/96")
# getaddrinfo cannot be given a timeout; lookups run here so a hung resolver costs the
# caller at most its connect timeout (the lookup thread finishes on its own later).
_RESOLVER = ThreadPoolExecutor(max_workers=4, thread_name_prefix="blipserve-dns")

log = logging.getLogger(__name__)


def internal_address_reason(ip: IPAddress) -> str | None:
    """Why ``ip`` must not be fetched from ("a loopback address"), or None if it is public.

    IPv6 forms that embed an IPv4 address (mapped ``::ffff:a.b.c.d``, compatible
    ``::a.b.c.d``, 6to4 ``2002::/16``, NAT64 ``64:ff9b::/96``, Teredo) are judged by the
    embedded address too, since the packets can end up there.
    """
    if isinstance(ip, ipaddress.IPv6Address):
        embedded: ipaddress.IPv4Address | None = ip.ipv4_mapped or ip.sixtofour
        if ip.teredo is not None:
            embedded = ip.teredo[1]
        if any(ip in net for net in _NAT64) or (ip in _V4_COMPAT and int(ip) > 1):
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            reason = internal_address_reason(embedded)
            if reason is not None:
                return f"{reason} (embedded {embedded})"
            if ip.ipv4_mapped is not None:
                return None  # ::ffff:8.8.8.8 is 8.8.8.8; Python calls the range private
    checks: tuple[tuple[bool, str], ...] = (
        (ip.is_unspecified, "an unspecified address"),
        (ip.is_loopback, "a loopback address"),
        (ip.is_link_local, "a link-local address"),
        (ip.is_multicast, "a multicast address"),
        (isinstance(ip, ipaddress.IPv4Address) and ip in _SHARED_V4, "a shared (CGNAT) address"),
        (isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local, "a site-local address"),
        (ip.is_private, "a private address"),
        (ip.is_reserved, "a reserved address"),
        # Catch-all for special ranges the flags above do not name (documentation,
        # benchmarking, IETF protocol assignments, ...): only global unicast is fetched.
        (not ip.is_global, "not a globally routable address"),
    )
    for bad, reason in checks:
        if bad:
            return reason
    return None


def _normalise_host(host: str) -> str:
    """Lower-case, no trailing dot, and IP literals in canonical form."""
    host = host.strip().lower().rstrip(".")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


def _parse_allow_entry(entry: str) -> tuple[str, int | None]:
    """``host``, ``host:port``, ``[v6]``, ``[v6]:port`` or a bare IPv6 -> (host, port)."""
    entry = entry.strip()
    host, port = entry, None
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        if rest.startswith(":"):
            port = int(rest[1:])
    elif entry.count(":") == 1:
        host, _, port_text = entry.partition(":")
        port = int(port_text)
    return _normalise_host(host), port


def _short(url: str, limit: int = 200) -> str:
    return url if len(url) <= limit else url[:limit] + "..."


@dataclass(frozen=True)
class FetchTarget:
    """One URL that passed the guard: where to connect and what to ask for."""

    url: str
    scheme: str
    host: str  # ASCII (IDNA) host name or IP literal without brackets
    port: int
    target: str  # path + query, percent-encoded
    addresses: tuple[str, ...]  # the vetted IPs we will connect to, in order

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if _DEFAULT_PORTS[self.scheme] == self.port else f"{host}:{self.port}"


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
        try:
            self._allowed = frozenset(_parse_allow_entry(e) for e in self.config.allow_url_hosts)
        except ValueError as exc:
            raise ValueError(
                f"allow_url_hosts: bad entry in {self.config.allow_url_hosts!r}: {exc}"
            ) from exc
        # Verifying context with certifi's CA bundle (httpx's default); an SSLContext may be
        # shared by threads for wrapping sockets.
        self._ssl_context = ssl_context if ssl_context is not None else httpx.create_ssl_context()

    def is_allowed(self, host: str, port: int) -> bool:
        """Whether ``host:port`` is on the allow-list (skips the internal-address check)."""
        host = _normalise_host(host)
        return (host, None) in self._allowed or (host, port) in self._allowed

    def check(self, url: str, timeout: float | None = None) -> FetchTarget:
        """Apply the guard to one URL; returns where to connect or raises UrlRefused.

        ``timeout`` bounds the DNS lookup (default: ``connect_timeout_s``).
        """
        if not self.config.allow_urls:
            raise UrlRefused("URL refused: image URLs are not accepted (allow_urls is off)")
        try:
            parts = urlsplit(url.strip())
            port_or_none = parts.port
        except ValueError as exc:
            raise UrlRefused(f"URL refused: malformed URL {_short(url)!r}: {exc}") from None
        scheme = parts.scheme.lower()
        if scheme not in _DEFAULT_PORTS:
            raise UrlRefused(f"URL refused: scheme {scheme!r} is not allowed (only http and https)")
        if parts.username is not None or parts.password is not None or "@" in parts.netloc:
            raise UrlRefused("URL refused: URLs with credentials (user:password@) are not allowed")
        raw_host = parts.hostname or ""
        if not raw_host:
            raise UrlRefused(f"URL refused: no host in {_short(url)!r}")
        try:
            host = _normalise_host(raw_host.encode("idna").decode("ascii"))
        except UnicodeError:
            raise UrlRefused(f"URL refused: invalid host name {raw_host!r}") from None
        if "%" in host:
            raise UrlRefused(f"URL refused: IPv6 zone ids are not allowed ({raw_host!r})")
        port = _DEFAULT_PORTS[scheme] if port_or_none is None else port_or_none
        if port == 0:
            raise UrlRefused("URL refused: port 0")
        # getaddrinfo also turns numeric shorthands (127.1, 2130706433, 0x7f000001,
        # 0177.0.0.1) into the address they really mean, so we judge the resolved addresses,
        # never the string.  Every address is checked: one bad answer refuses the host.
        lookup = _RESOLVER.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
        try:
            infos = lookup.result(self.config.connect_timeout_s if timeout is None else timeout)
        except FutureTimeout:
            raise FetchError(f"timed out resolving host {raw_host!r}") from None
        except (OSError, UnicodeError) as exc:
            raise FetchError(f"could not resolve host {raw_host!r}: {exc}") from None
        addresses: list[str] = []
        for family, *_, sockaddr in infos:
            if family not in (socket.AF_INET, socket.AF_INET6):
                continue
            ip_text = str(sockaddr[0])
            if ip_text not in addresses:
                addresses.append(ip_text)
        if not addresses:
            raise FetchError(f"could not resolve host {raw_host!r} to an IP address")
        if not self.is_allowed(host, port):
            for ip_text in addresses:
                reason = internal_address_reason(ipaddress.ip_address(ip_text.split("%")[0]))
                if reason is not None:
                    # The address stays in the log: telling the client which internal
                    # address a name resolves to would help it map the inside.
                    log.warning("refused URL host %r: %s is %s", raw_host, ip_text, reason)
                    public = reason.split(" (embedded", 1)[0]
                    raise UrlRefused(f"URL refused: host {raw_host!r} resolves to {public}")
        target = quote(parts.path or "/", safe="/%:@!$&'()*+,;=-._~")
        if parts.query:
            target += "?" + quote(parts.query, safe="/?%:@!$&'()*+,;=-._~")
        return FetchTarget(url, scheme, host, port, target, tuple(addresses))

    def fetch(self, url: str) -> bytes:
        """GET ``url`` (following vetted redirects) and return the body bytes."""
        cfg = self.config
        deadline = time.monotonic() + cfg.read_timeout_s
        current = url
        for _hop in range(cfg.max_redirects + 1):
            remaining = max(deadline - time.monotonic(), 0.001)
            target = self.check(current, timeout=min(cfg.connect_timeout_s, remaining))
            body, location = self._get(target, deadline)
            if location is None:
                return body
            current = urljoin(current, location)  # checked on the next hop
        raise FetchError(
            f"too many redirects fetching {_short(url)} (more than {cfg.max_redirects}; "
            "max_redirects)"
        )

    def _get(self, target: FetchTarget, deadline: float) -> tuple[bytes, str | None]:
        """One request to a vetted target: (body, None) or (b"", redirect location)."""
        cfg = self.config
        url = _short(target.url)
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
