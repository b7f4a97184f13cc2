"""Outbound HTTP to a client-named URL, connected only to addresses that were checked (SSRF guard).

The host is resolved once; every address must be global unless `allow_private`; the connection goes
to those addresses themselves (TLS: SNI and the certificate check are for the name), with the name in
the Host header. So a name cannot pass the check and then resolve elsewhere (DNS rebinding). Redirects
are never followed here: the caller checks each hop as a new URL. Used by webhooks and URL inputs.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from urllib.parse import urlparse

import urllib3

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


def request(method: str, url: str, *, host: str, allow_private: bool, headers: dict[str, str],
            body: bytes | None = None, timeout: urllib3.Timeout, stream: bool = False) -> urllib3.BaseHTTPResponse:
    """`method url` sent to the checked addresses of `host` (the URL's canonical host name), the next one
    when one does not connect. PermissionError when an address is not global and that is not allowed."""
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    addresses = resolve_host(host, port)
    blocked = [a for a in addresses if non_global(a)]
    if blocked and not allow_private:
        raise PermissionError(f"{host} resolves to a non-global address ({blocked[0]})")
    path = (parsed.path or "/") + (f"?{parsed.query}" if parsed.query else "")
    headers = {**headers, "Host": parsed.netloc.rsplit("@", 1)[-1]}
    for number, address in enumerate(addresses, 1):  # every one was checked
        pool: urllib3.HTTPConnectionPool
        if parsed.scheme == "https":
            pool = urllib3.HTTPSConnectionPool(address, port, server_hostname=host, assert_hostname=host,
                                               timeout=timeout, retries=False)
        else:
            pool = urllib3.HTTPConnectionPool(address, port, timeout=timeout, retries=False)
        try:
            return pool.urlopen(method, path, body=body, headers=headers, redirect=False, retries=False,
                                assert_same_host=False, preload_content=not stream)
        except urllib3.exceptions.NewConnectionError:
            pool.close()
            if number == len(addresses):
                raise
    raise OSError(f"{host} resolves to no address")
