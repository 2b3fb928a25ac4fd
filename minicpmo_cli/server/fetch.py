"""Fetching an http(s) image_url / video_url for a request, without letting the request reach inside the network.

Each hop of a fetch resolves its host once, refuses addresses that are not public (loopback, private,
link-local, multicast, unspecified, reserved; unless the server runs with --allow-private-urls), and
connects to the very address it checked: the name is never looked up a second time (a DNS answer that
changes between the check and the connection cannot move the request inside). The Host header and the
TLS server name stay those of the URL. Redirects are followed by hand, each hop checked the same way; only
http and https are fetched. A whole fetch, redirects included, has one deadline (a server trickling a
byte at a time cannot hold it longer), and at most ``max_bytes`` are read.

Every failure reads the same to the client (:data:`FAILURE`): a client must not learn whether a port is
open, closed or filtered. The reason goes to the server log.
"""

from __future__ import annotations

import http.client
import ipaddress
import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

logger = logging.getLogger("minicpmo_cli.server")

MAX_REDIRECTS = 5
REDIRECTS = (301, 302, 303, 307, 308)
CHUNK = 65536
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


@dataclass(frozen=True)
class FetchLimits:
    """What a request's media may cost: the URL fetches, and how long its audio may be."""

    max_bytes: int = 25 * 1024 * 1024
    timeout: float = 10.0  # seconds for the whole fetch, redirects included
    allow_http: bool = True  # fetch http(s) URLs at all (serve --no-url-fetch: False)
    allow_private: bool = False  # fetch from loopback / private / link-local addresses too
    max_audio_seconds: float | None = None  # longest audio of a chat request (set per request: what the context holds)
    max_transcription_seconds: float = 2 * 3600.0  # longest audio file to transcribe or translate

    def failure(self) -> str:
        """The one text every failed fetch gets."""
        where = "an http(s) URL" if self.allow_private else "an http(s) URL on a public address"
        return (f"cannot fetch the URL (it must be {where}, of a readable file of at most {self.max_bytes} bytes, "
                f"that answers within {self.timeout:g} s)")


class FetchFailed(Exception):
    """A fetch that failed; the message (the reason) is for the server log only."""


def fetch(url: str, limits: FetchLimits) -> bytes:
    """The body behind ``url`` (blocking: call it off the event loop). Raises FetchFailed with the reason."""
    deadline = time.monotonic() + limits.timeout
    for _ in range(MAX_REDIRECTS + 1):
        status, location, body = _fetch_once(url, limits, deadline)
        if status not in REDIRECTS:
            return body
        if not location:
            raise FetchFailed(f"{url}: redirect {status} without a Location")
        url = urljoin(url, location)
    raise FetchFailed(f"more than {MAX_REDIRECTS} redirects")


@dataclass(frozen=True)
class _Target:
    scheme: str
    host: str  # as the URL names it (Host header, TLS server name)
    port: int
    path: str  # path and query


def _target(url: str) -> _Target:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise FetchFailed(f"{url!r}: not a valid URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise FetchFailed(f"{url!r}: scheme {scheme!r} is not http(s)")
    if not parts.hostname:
        raise FetchFailed(f"{url!r}: no host")
    if parts.username or parts.password:
        raise FetchFailed(f"{url!r}: credentials in the URL")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return _Target(scheme, parts.hostname, port or (443 if scheme == "https" else 80), path)


def refusal(address: str) -> str | None:
    """Why ``address`` may not be fetched from without --allow-private-urls (None: it is public)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):  # an IPv4 address inside (mapped, 6to4, NAT64) is what is reached
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif ip.sixtofour is not None:
            ip = ip.sixtofour
        elif ip in _NAT64:
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    for name in ("unspecified", "loopback", "link_local", "multicast", "site_local", "reserved", "private"):
        if getattr(ip, f"is_{name}", False):
            article = "an" if name[0] in "aeiou" else "a"
            return f"{ip} is {article} {name.replace('_', '-')} address"
    if not ip.is_global:
        return f"{ip} is not a public address"
    return None


def _getaddrinfo(target: _Target, timeout: float) -> list:
    """getaddrinfo within ``timeout`` (it cannot be interrupted: a lookup that hangs is left to its thread)."""
    found: dict = {}

    def lookup() -> None:
        try:
            found["infos"] = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            found["error"] = exc

    thread = threading.Thread(target=lookup, name="minicpmo-resolve", daemon=True)
    thread.start()
    thread.join(max(timeout, 0.0))
    if thread.is_alive():
        raise FetchFailed(f"{target.host}: no DNS answer in time")
    if "error" in found:
        raise FetchFailed(f"{target.host}: cannot resolve ({found['error']})")
    return found["infos"]


def _resolve(target: _Target, limits: FetchLimits, deadline: float) -> str:
    """The one address this hop connects to, checked."""
    infos = _getaddrinfo(target, deadline - time.monotonic())
    addresses = [info[4][0] for info in infos]
    if not addresses:
        raise FetchFailed(f"{target.host}: no address")
    if not limits.allow_private:
        # Every address the name has must be public: one private answer means the name points inside.
        for address in addresses:
            reason = refusal(address)
            if reason is not None:
                raise FetchFailed(f"{target.host}: {reason} (serve --allow-private-urls fetches it)")
    return addresses[0]


class _PinnedHTTP(http.client.HTTPConnection):
    """An HTTP connection to ``address``, whatever its host name resolves to now."""

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self.address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self.address, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self.address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self.address, self.port), self.timeout)  # the deadline can shut it
        self.sock = self._context.wrap_socket(self.sock, server_hostname=self.host)


def _fetch_once(url: str, limits: FetchLimits, deadline: float) -> tuple[int, str | None, bytes]:
    """(status, Location, body) of one GET; the body is read only for a 2xx answer."""
    target = _target(url)
    address = _resolve(target, limits, deadline)
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise FetchFailed("the deadline passed")
    kind = _PinnedHTTPS if target.scheme == "https" else _PinnedHTTP
    connection = kind(target.host, target.port, address, timeout=remaining)
    # The deadline holds whatever the server does: at the deadline the socket is shut, which ends any read.
    timer = threading.Timer(remaining, _shut, args=(connection,))
    timer.daemon = True
    timer.start()
    try:
        connection.request("GET", target.path, headers={"User-Agent": "minicpmo", "Accept": "*/*",
                                                        "Accept-Encoding": "identity"})
        response = connection.getresponse()
        if response.status in REDIRECTS:
            return response.status, response.getheader("Location"), b""
        if not 200 <= response.status < 300:
            raise FetchFailed(f"{url}: HTTP {response.status}")
        return response.status, None, _body(response, limits, deadline)
    except (OSError, http.client.HTTPException, ValueError) as exc:
        if time.monotonic() >= deadline:
            raise FetchFailed(f"{url}: took longer than {limits.timeout:g} s") from None
        raise FetchFailed(f"{url}: {type(exc).__name__}: {exc}") from None
    finally:
        timer.cancel()
        connection.close()


def _body(response: http.client.HTTPResponse, limits: FetchLimits, deadline: float) -> bytes:
    length = response.getheader("Content-Length", "")
    if length.isdigit() and int(length) > limits.max_bytes:
        raise FetchFailed(f"Content-Length {length} is over {limits.max_bytes} bytes")
    chunks, size = [], 0
    while True:
        chunk = response.read1(CHUNK)  # returns what one read gives: never waits for a whole chunk
        if not chunk:
            if time.monotonic() >= deadline:  # the timer shut the socket: an end, but not the body's
                raise FetchFailed(f"took longer than {limits.timeout:g} s")
            if length.isdigit() and size < int(length):
                raise FetchFailed(f"the body ended after {size} of {length} bytes")
            return b"".join(chunks)
        size += len(chunk)
        if size > limits.max_bytes:
            raise FetchFailed(f"more than {limits.max_bytes} bytes")
        if time.monotonic() >= deadline:
            raise FetchFailed(f"took longer than {limits.timeout:g} s")
        chunks.append(chunk)


def _shut(connection: http.client.HTTPConnection) -> None:
    sock = connection.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
