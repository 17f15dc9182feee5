"""Fetch http(s) inputs without letting a user-supplied URL reach the worker's own network.

A worker that fetches whatever URL a job names can be turned against its own network:
the cloud metadata service (169.254.169.254) hands out credentials, and intranet services
trust anything on the private network. So every hop, redirects included, is checked
before any connection is made: the scheme, the host against an optional allow-list, and
every address the host resolves to. The connection then goes to one of those checked
addresses, never to the name again, so DNS rebinding between check and connect gains
nothing. TLS still verifies the certificate against the name from the URL.

Only the standard library is used, and `http.client` rather than `urllib.request`, so no
proxy settings from the environment can route a request around these checks.

Failures are `ItemError`s with a stable code: `http-disabled`, `unsupported-scheme`,
`bad-uri`, `host-not-allowed`, `blocked-address`, `too-many-redirects`, `not-found`,
`access-denied`, `http-error`, `too-large`, `fetch-error`. Messages are one line and show
only scheme://host[:port]/path: query strings and user info can carry tokens.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import ipaddress
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

from explainctl.io.uri import one_line as _one_line
from explainctl.spec.errors import InvalidInput, ItemError

__all__ = ["HttpPolicy", "fetch_http"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[..., Sequence[tuple[Any, ...]]]

_SCHEMES = {"http": 80, "https": 443}
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_READ_CHUNK = 64 * 1024
_HOST_RE = re.compile(r"^[a-z0-9_-]+(?:\.[a-z0-9_-]+)*$")
# Characters left as they are in the request target; everything else (spaces, controls,
# non-ASCII) is percent-encoded so a Location header cannot smuggle bytes into the request.
_TARGET_SAFE = "!$&'()*+,/:;=?@~%[]"

_PUBLIC, _PRIVATE, _FORBIDDEN = "public", "private", "forbidden"

# Ranges `allow_private` opens: loopback, RFC 1918, shared address space (CGNAT, also
# used by overlay VPNs such as Tailscale), and IPv6 unique-local and site-local.
_PRIVATE_V4 = tuple(
    ipaddress.IPv4Network(n)
    for n in ("127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10")
)
_PRIVATE_V6 = tuple(ipaddress.IPv6Network(n) for n in ("::1/128", "fc00::/7", "fec0::/10"))
# Cloud metadata endpoints that sit inside ranges `allow_private` opens (or that are
# link-local anyway and listed to make the intent plain). Never reachable.
_METADATA = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OCI, OpenStack
        "169.254.170.2",  # AWS ECS task credentials
        "fd00:ec2::254",  # AWS IMDS over IPv6, inside fc00::/7
        "100.100.100.200",  # Alibaba Cloud, inside 100.64.0.0/10
        "192.0.0.192",  # older Oracle Cloud
    )
)
# 6to4 and NAT64 addresses carry an IPv4 address that a relay or gateway will reach, so
# that inner address has to pass too; `ipaddress` calls 2002::/16 global regardless.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


@dataclass(frozen=True)
class HttpPolicy:
    """What a worker may fetch over http(s).

    `allowed_hosts`, when non-empty, lists the only hostnames accepted: exact names
    (case-insensitive) or "*.example.com", which matches any name below example.com but
    not example.com itself. It is checked before the name is resolved.

    `allow_private` is for tests and trusted intranets only. It opens loopback, RFC 1918,
    100.64.0.0/10 and IPv6 unique-local / site-local targets, but never link-local
    (169.254.0.0/16, fe80::/10) or a known cloud metadata address: those stay blocked
    whatever the policy, since reaching them from a worker leaks its credentials.

    `timeout` bounds each connect and each read; `deadline` the whole fetch, redirects
    included: a server that drips a byte a second passes every read's timeout, and would
    hold the worker's item for hours.
    """

    enabled: bool = False
    allowed_hosts: tuple[str, ...] = ()
    allow_private: bool = False
    max_redirects: int = 5
    timeout: float = 10.0
    deadline: float = 60.0

    def __post_init__(self) -> None:
        # A bare string would be iterated as single characters and allow-list nonsense.
        if isinstance(self.allowed_hosts, str):
            raise InvalidInput("allowed_hosts must be a sequence of hostnames, not one string")
        patterns = tuple(_normalise_pattern(p) for p in self.allowed_hosts)
        object.__setattr__(self, "allowed_hosts", patterns)
        redirects = self.max_redirects
        if isinstance(redirects, bool) or not isinstance(redirects, int) or redirects < 0:
            raise InvalidInput(f"max_redirects must be a non-negative integer, got {redirects!r}")
        for name in ("timeout", "deadline"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise InvalidInput(f"{name} must be a positive number of seconds, got {value!r}")


@dataclass(frozen=True)
class _Target:
    scheme: str
    host: str  # lowercase ASCII, no brackets, no trailing dot
    port: int
    request_target: str  # path and query, as sent on the request line
    shown: str  # scheme://host[:port]/path, for messages


# --------------------------------------------------------------------------- messages


def _shown(url: object) -> str:
    """scheme://host[:port]/path of a URL, never its user info, query or fragment."""
    if not isinstance(url, str):
        return "<not a URL>"
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "<malformed URL>"
    if ":" in host:
        host = f"[{host}]"
    netloc = host if port is None else f"{host}:{port}"
    return _one_line(f"{parts.scheme}://{netloc}{parts.path}")


# --------------------------------------------------------------------------- URLs and hosts


def _normalise_host(host: str) -> str | None:
    """ASCII, lowercase, no trailing dot; None when it is not a plausible host."""
    if host.endswith("."):
        host = host[:-1]
    if not host:
        return None
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    host = host.lower()
    if _HOST_RE.match(host) or _ip_literal(host) is not None:
        return host
    return None


def _normalise_pattern(pattern: object) -> str:
    if not isinstance(pattern, str):
        raise InvalidInput(f"allowed_hosts entries must be strings, got {pattern!r}")
    pattern = pattern.strip()
    wildcard = pattern.startswith("*.")
    name = _normalise_host(pattern[2:] if wildcard else pattern)
    if name is None:
        raise InvalidInput(
            f"invalid allowed_hosts entry {pattern!r} (use 'host.example.com' or '*.example.com')"
        )
    return f"*.{name}" if wildcard else name


def _ip_literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _host_allowed(host: str, patterns: tuple[str, ...]) -> bool:
    if not patterns:
        return True
    for pattern in patterns:
        if pattern.startswith("*."):
            # pattern[1:] keeps the dot, so "*.example.com" never matches "badexample.com".
            if host.endswith(pattern[1:]) and _ip_literal(host) is None:
                return True
        elif host == pattern:
            return True
    return False


def _parse(url: object) -> _Target:
    if not isinstance(url, str) or not url.strip():
        raise ItemError("bad-uri", "empty or non-string URL")
    shown = _shown(url)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as err:
        raise ItemError("bad-uri", f"malformed URL {shown}: {_one_line(str(err))}") from None
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES:
        raise ItemError(
            "unsupported-scheme",
            f"unsupported URL scheme {_one_line(scheme)!r} in {shown} (only http and https)",
        )
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise ItemError("bad-uri", f"URL with user info (user:password@) is refused: {shown}")
    host = _normalise_host(parts.hostname or "")
    if host is None:
        raise ItemError("bad-uri", f"URL without a valid host: {shown}")
    target = quote(parts.path or "/", safe=_TARGET_SAFE)
    if parts.query:
        target += "?" + quote(parts.query, safe=_TARGET_SAFE)
    return _Target(
        scheme=scheme,
        host=host,
        port=port if port is not None else _SCHEMES[scheme],
        request_target=target,
        shown=shown,
    )


# --------------------------------------------------------------------------- addresses


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _classify(ip: IPAddress) -> str:
    if isinstance(ip, ipaddress.IPv6Address):
        # A zone id would make equality with the metadata addresses fail.
        ip = ipaddress.IPv6Address(int(ip))
        if ip.ipv4_mapped is not None:
            # A dual-stack socket connecting to ::ffff:a.b.c.d reaches a.b.c.d.
            return _classify(ip.ipv4_mapped)
    if ip in _METADATA or ip.is_link_local:
        return _FORBIDDEN
    ranges = _PRIVATE_V4 if ip.version == 4 else _PRIVATE_V6
    if any(ip in net for net in ranges):
        return _PRIVATE
    # `is_global` alone is not enough: it is true for multicast, for IPv6 site-local and
    # for 6to4 in the Python versions we support.
    if (
        not ip.is_global
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
        or ip.is_loopback
        or ip.is_private
        or (isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local)
    ):
        return _FORBIDDEN
    if isinstance(ip, ipaddress.IPv6Address):
        inner = _embedded_ipv4(ip)
        if inner is not None and _classify(inner) != _PUBLIC:
            return _FORBIDDEN
    return _PUBLIC


def _blocked(target: _Target, allow_private: bool, verdict: str) -> ItemError:
    if verdict == _FORBIDDEN and allow_private:
        why = "a link-local, cloud-metadata or otherwise non-routable address, never allowed"
    else:
        why = "a non-public address"
    # The address itself stays out of the message: echoing it would let a job map
    # internal DNS names to internal addresses.
    return ItemError(
        "blocked-address", f"{target.shown}: host {target.host} resolves to {why}; not fetched"
    )


def _checked_addresses(target: _Target, policy: HttpPolicy, resolver: Resolver) -> list[IPAddress]:
    literal = _ip_literal(target.host)
    if literal is not None:
        candidates = [literal]
    else:
        try:
            infos = resolver(target.host, target.port, type=socket.SOCK_STREAM)
        except UnicodeError:
            raise ItemError("bad-uri", f"{target.shown}: host name cannot be encoded") from None
        except OSError as err:
            raise ItemError(
                "fetch-error",
                f"{target.shown}: cannot resolve {target.host}: {_one_line(str(err))}",
            ) from None
        candidates = []
        for info in infos:
            address = _ip_literal(str(info[4][0])) if len(info) >= 5 and info[4] else None
            if address is None:
                # Something we cannot classify is something we cannot vouch for.
                raise _blocked(target, policy.allow_private, _FORBIDDEN)
            candidates.append(address)
    checked: list[IPAddress] = []
    for address in candidates:
        verdict = _classify(address)
        if verdict == _FORBIDDEN or (verdict == _PRIVATE and not policy.allow_private):
            # One bad address blocks the host: otherwise a name listing a public and a
            # private address would reach the private one whenever the first fails.
            raise _blocked(target, policy.allow_private, verdict)
        if address not in checked:
            checked.append(address)
    if not checked:
        raise ItemError("fetch-error", f"{target.shown}: {target.host} resolved to no address")
    return checked


# --------------------------------------------------------------------------- connections


@functools.cache
def _tls_context() -> ssl.SSLContext:
    # Loading the system trust store costs milliseconds; contexts are safe to share.
    return ssl.create_default_context()


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Talks to `host` (Host header, TLS name) but connects only to checked addresses."""

    def __init__(self, host: str, port: int, *, addresses: list[IPAddress], timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._addresses = addresses

    def connect(self) -> None:
        last: OSError | None = None
        for address in self._addresses:
            try:
                self.sock = socket.create_connection((str(address), self.port), self.timeout)
                break
            except OSError as err:
                last = err
        else:
            assert last is not None  # _checked_addresses never returns an empty list
            raise last
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Kept: the connection forgets its socket once a response says it will close, and
        # the deadline must still be able to shut it.
        self.held_sock = self.sock


class _PinnedHTTPSConnection(_PinnedHTTPConnection):
    default_port = 443  # so the Host header omits ":443", as for any https client

    def connect(self) -> None:
        super().connect()
        self.sock = _tls_context().wrap_socket(self.sock, server_hostname=self.host)
        self.held_sock = self.sock


def _cut(conn: http.client.HTTPConnection, cut: threading.Event) -> None:
    """Past the deadline: shut the socket, which wakes the read blocked on it."""
    cut.set()
    held = getattr(conn, "held_sock", None)
    if held is not None:
        with contextlib.suppress(OSError):
            held.shutdown(socket.SHUT_RDWR)


def _get(
    target: _Target, addresses: list[IPAddress], policy: HttpPolicy, max_bytes: int, ends: float
) -> tuple[str | None, bytes | None]:
    """One GET: (None, body) on success, (Location or None, None) for a redirect; cut off
    at `ends` (time.monotonic()), however slowly the server sends."""
    cls = _PinnedHTTPSConnection if target.scheme == "https" else _PinnedHTTPConnection
    left = ends - time.monotonic()
    if left <= 0:  # redirects used it up
        raise ItemError("fetch-error", f"{target.shown}: not fetched within {policy.deadline:g} s")
    conn = cls(target.host, target.port, addresses=addresses, timeout=min(policy.timeout, left))
    cut = threading.Event()
    timer = threading.Timer(max(left, 0.0), _cut, args=(conn, cut))
    timer.daemon = True
    timer.start()
    try:
        return _exchange(conn, target, max_bytes, cut, policy)
    finally:
        timer.cancel()
        conn.close()


def _exchange(
    conn: http.client.HTTPConnection,
    target: _Target,
    max_bytes: int,
    cut: threading.Event,
    policy: HttpPolicy,
) -> tuple[str | None, bytes | None]:
    def late() -> ItemError:
        return ItemError("fetch-error", f"{target.shown}: not fetched within {policy.deadline:g} s")

    try:
        conn.putrequest("GET", target.request_target, skip_accept_encoding=True)
        conn.putheader("User-Agent", "explainctl")
        conn.putheader("Accept", "*/*")
        # A compressed body would need decoding and could inflate past max_bytes.
        conn.putheader("Accept-Encoding", "identity")
        conn.putheader("Connection", "close")
        conn.endheaders()
        response = conn.getresponse()
        status = response.status
        if status in _REDIRECTS:
            return response.getheader("Location"), None
        _check_status(target, status, response.reason)
        if response.length is not None and response.length > max_bytes:
            raise ItemError(
                "too-large",
                f"{target.shown}: Content-Length {response.length} exceeds {max_bytes} bytes",
            )
        body = _read_bounded(target, response, max_bytes)
        if cut.is_set():  # a close-delimited body ends early, without an error
            raise late()
        return None, body
    except http.client.InvalidURL as err:
        raise ItemError("bad-uri", f"{target.shown}: {_one_line(str(err))}") from None
    except (OSError, http.client.HTTPException) as err:
        if cut.is_set():
            raise late() from None
        detail = _one_line(str(err)) or "no detail"
        raise ItemError("fetch-error", f"{target.shown}: {type(err).__name__}: {detail}") from None


def _check_status(target: _Target, status: int, reason: str) -> None:
    if 200 <= status < 300:
        return
    shown = f"{target.shown}: HTTP {status} {_one_line(reason, 80)}".rstrip()
    if status in (404, 410):
        raise ItemError("not-found", shown)
    if status in (401, 403):
        raise ItemError("access-denied", shown)
    raise ItemError("http-error", shown)


def _read_bounded(target: _Target, response: http.client.HTTPResponse, max_bytes: int) -> bytes:
    # Chunked and close-delimited bodies announce no size; stop one byte past the limit.
    chunks: list[bytes] = []
    total = 0
    while total <= max_bytes:
        # read1: what has arrived, so a cut-off socket ends the loop at once.
        chunk = response.read1(min(_READ_CHUNK, max_bytes + 1 - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    if total > max_bytes:
        raise ItemError("too-large", f"{target.shown}: larger than {max_bytes} bytes")
    return b"".join(chunks)


# --------------------------------------------------------------------------- entry point


def fetch_http(
    url: str,
    *,
    max_bytes: int,
    policy: HttpPolicy,
    resolver: Resolver = socket.getaddrinfo,
) -> bytes:
    """GET an http(s) URL under `policy`, following redirects, never more than max_bytes.

    `resolver` is called like `socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)`;
    hosts written as IP addresses are not passed to it. Every address it returns must be
    acceptable, or nothing is fetched.
    """
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
        raise InvalidInput(f"max_bytes must be a non-negative integer, got {max_bytes!r}")
    if not isinstance(policy, HttpPolicy):
        raise InvalidInput(f"policy must be an HttpPolicy, got {type(policy).__name__}")
    if not policy.enabled:
        raise ItemError(
            "http-disabled",
            f"http(s) inputs are off on this worker ({_shown(url)}); to turn them on, start "
            "the worker with EXPLAINCTL_ALLOW_HTTP=1",
        )
    current = url
    redirects = 0
    ends = time.monotonic() + policy.deadline
    while True:
        try:
            target = _parse(current)
            if not _host_allowed(target.host, policy.allowed_hosts):
                raise ItemError(
                    "host-not-allowed",
                    f"{target.shown}: host {target.host} is not in this worker's allowed hosts",
                )
            addresses = _checked_addresses(target, policy, resolver)
            location, body = _get(target, addresses, policy, max_bytes, ends)
            if body is not None:
                return body
            if not location:
                raise ItemError("http-error", f"{target.shown}: redirect without a Location")
            if redirects >= policy.max_redirects:
                raise ItemError(
                    "too-many-redirects",
                    f"{target.shown}: more than {policy.max_redirects} redirects",
                )
        except ItemError as err:
            if redirects:
                # Say where the chain started: the failing hop alone may mean nothing to
                # whoever submitted the job.
                raise ItemError(
                    err.code, f"{err.message} (reached by redirect from {_shown(url)})"
                ) from None
            raise
        redirects += 1
        current = urljoin(current, location)
