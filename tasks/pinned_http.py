"""Outbound HTTP to a client-named URL, connected only to addresses that were checked (SSRF guard).

The host is resolved once; every address must be global unless `allow_private`; the connection goes
to those addresses themselves (TLS: SNI and the certificate check are for the name), with the name in
the Host header. So a name cannot pass the check and then resolve elsewhere (DNS rebinding). Redirects
are never followed here: the caller checks each hop as a new URL. Used by webhooks and URL inputs.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import socket
import threading
import time
from typing import Any, TypeVar
from urllib.parse import urlparse

import urllib3

_Connection = TypeVar("_Connection")

_NUMERIC_IPV4 = re.compile(r"^(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]+)){0,3}$")


def canonical_host(host: str) -> str:
    """The host as a resolver reads it: IP literals in canonical form (ValueError for a numeric host
    that is no address), names lower-cased without a trailing dot."""
    host = host.strip().lower().rstrip(".")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if _NUMERIC_IPV4.match(host):  # inet_aton semantics: what getaddrinfo accepts as an IPv4 literal
        try:
            return socket.inet_ntoa(socket.inet_aton(host))
        except OSError:
            raise ValueError(f"{host!r} is not an IPv4 address") from None
    return host


def url_host(url: str) -> str:
    """The canonical host of `url`; ValueError for a URL no request can go to: malformed, a port out of
    range, or a name that does not IDNA-encode (an empty or over-63-character label: getaddrinfo refuses it)."""
    parsed = urlparse(url)
    parsed.port  # noqa: B018 - raises on a port out of range
    host = canonical_host(parsed.hostname or "")
    host.encode("idna")
    return host


def non_global(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not ip.is_global


def non_global_address(url: str, *, resolve: bool = True) -> str | None:
    """The first non-global address `url`'s host is (or, with `resolve`, resolves to), else None."""
    try:
        host = canonical_host(urlparse(url).hostname or "")
    except ValueError:
        return urlparse(url).hostname
    if host == "localhost" or host.endswith(".localhost"):
        return host
    try:
        return host if non_global(host) else None
    except ValueError:
        pass
    if not resolve:
        return None
    try:
        addresses = resolve_host(host, 0)
    except OSError:
        return None  # unresolvable: the POST fails on its own
    return next((a for a in addresses if non_global(a)), None)


def resolve_host(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (an IP literal: itself)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


class Deadline:
    """A wall-clock limit on requests and the reading of their bodies, held while the context is open: when
    it passes, the sockets of the connections made under it are shut down, so a server that trickles its
    headers or body cannot hold a request past it (socket timeouts bound each read, not their sum)."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.end = seconds, time.monotonic() + seconds
        self._connections: list[object] = []
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="http-deadline", daemon=True)

    def left(self) -> float:
        """Seconds until the deadline (0 once it passed)."""
        return max(0.0, self.end - time.monotonic())

    def timeout(self, connect: float, read: float) -> urllib3.Timeout:
        """Connect and per-read timeouts cut to the time left."""
        left = max(self.left(), 0.001)  # urllib3 refuses 0
        return urllib3.Timeout(connect=min(connect, left), read=min(read, left))

    def watch(self, connection: _Connection) -> _Connection:
        self._connections.append(connection)
        return connection

    def _watch(self) -> None:
        """At the deadline shut every socket down, then again every 0.1 s (one may still have been connecting)."""
        if self._closed.wait(self.left()):
            return
        while True:
            for connection in list(self._connections):
                if (sock := getattr(connection, "sock", None)) is not None:
                    with contextlib.suppress(OSError):  # the TCP socket's shutdown, under TLS too
                        socket.socket.shutdown(sock, socket.SHUT_RDWR)
            if self._closed.wait(0.1):
                return

    def __enter__(self) -> Deadline:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._closed.set()


class _Watched:
    """Mixed into a urllib3 pool: hands each connection the pool makes to `deadline`."""
    deadline: Deadline | None = None

    def _new_conn(self) -> Any:
        connection = super()._new_conn()  # type: ignore[misc]  # the urllib3 pool it is mixed into
        return self.deadline.watch(connection) if self.deadline else connection


class _Pool(_Watched, urllib3.HTTPConnectionPool):
    """An http pool whose connections its deadline watches."""


class _TLSPool(_Watched, urllib3.HTTPSConnectionPool):
    """An https pool whose connections its deadline watches."""


def request(method: str, url: str, *, host: str, allow_private: bool, headers: dict[str, str],
            body: bytes | None = None, timeout: urllib3.Timeout, stream: bool = False,
            deadline: Deadline | None = None) -> urllib3.BaseHTTPResponse:
    """`method url` sent to the checked addresses of `host` (the URL's canonical host name), the next one
    when one does not connect; its connections are cut at `deadline`. PermissionError when an address is
    not global and that is not allowed."""
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    addresses = resolve_host(host, port)
    blocked = [a for a in addresses if non_global(a)]
    if blocked and not allow_private:
        raise PermissionError(f"{host} resolves to a non-global address ({blocked[0]})")
    path = (parsed.path or "/") + (f"?{parsed.query}" if parsed.query else "")
    headers = {**headers, "Host": parsed.netloc.rsplit("@", 1)[-1]}
    for number, address in enumerate(addresses, 1):  # every one was checked
        pool: _Pool | _TLSPool
        if parsed.scheme == "https":
            pool = _TLSPool(address, port, server_hostname=host, assert_hostname=host, timeout=timeout,
                            retries=False)
        else:
            pool = _Pool(address, port, timeout=timeout, retries=False)
        pool.deadline = deadline
        try:
            return pool.urlopen(method, path, body=body, headers=headers, redirect=False, retries=False,
                                assert_same_host=False, preload_content=not stream)
        except urllib3.exceptions.NewConnectionError:
            pool.close()
            if number == len(addresses):
                raise
    raise OSError(f"{host} resolves to no address")
