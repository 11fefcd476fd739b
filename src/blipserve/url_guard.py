"""Which image URLs may be fetched, and at which addresses: the guard against server-side
request forgery (SSRF).

Every hop (the URL and each redirect) goes through the same guard: http(s) only, no
credentials, and the host is resolved once and refused when any of its addresses is
internal (loopback, private, link-local, ...), unless the host is allow-listed.  The
vetted addresses come back in a :class:`FetchTarget`, and :mod:`blipserve.fetch` connects
to exactly those, so a DNS answer that changes between the check and the connect (DNS
rebinding) cannot redirect us inside.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

from blipserve.config import FetchConfig
from blipserve.errors import FetchError, UrlRefused

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_PORTS = {"http": 80, "https": 443}
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


def short_url(url: str, limit: int = 200) -> str:
    """``url`` cut to ``limit`` characters for a message."""
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
        return host if DEFAULT_PORTS[self.scheme] == self.port else f"{host}:{self.port}"


class UrlGuard:
    """Applies :class:`FetchConfig`'s URL policy; safe to share between threads."""

    def __init__(self, config: FetchConfig) -> None:
        self.config = config
        try:
            self._allowed = frozenset(_parse_allow_entry(e) for e in config.allow_url_hosts)
        except ValueError as exc:
            raise ValueError(
                f"allow_url_hosts: bad entry in {config.allow_url_hosts!r}: {exc}"
            ) from exc

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
            raise UrlRefused(f"URL refused: malformed URL {short_url(url)!r}: {exc}") from None
        scheme = parts.scheme.lower()
        if scheme not in DEFAULT_PORTS:
            raise UrlRefused(f"URL refused: scheme {scheme!r} is not allowed (only http and https)")
        if parts.username is not None or parts.password is not None or "@" in parts.netloc:
            raise UrlRefused("URL refused: URLs with credentials (user:password@) are not allowed")
        raw_host = parts.hostname or ""
        if not raw_host:
            raise UrlRefused(f"URL refused: no host in {short_url(url)!r}")
        try:
            host = _normalise_host(raw_host.encode("idna").decode("ascii"))
        except UnicodeError:
            raise UrlRefused(f"URL refused: invalid host name {raw_host!r}") from None
        if "%" in host:
            raise UrlRefused(f"URL refused: IPv6 zone ids are not allowed ({raw_host!r})")
        port = DEFAULT_PORTS[scheme] if port_or_none is None else port_or_none
        if port == 0:
            raise UrlRefused("URL refused: port 0")
        addresses = self._resolve(host, raw_host, port, timeout)
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

    def _resolve(self, host: str, raw_host: str, port: int, timeout: float | None) -> list[str]:
        """Every IP ``host`` resolves to, in the resolver's order, without repeats."""
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
        return addresses
