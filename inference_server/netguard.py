"""The SSRF guard: user-supplied URLs (webhooks, input images) may only reach the public internet.

Two layers:

* ``check_url`` is static and cheap, for request validation at submit: scheme, host present, and
  literal addresses (``http://10.0.0.1``, ``http://[::ffff:127.0.0.1]``, ``http://2130706433``) or
  ``localhost`` names refused with ``UnsafeURL`` (code ``unsafe_url``).
* ``pinned_request`` resolves the host once, checks every address, and connects to the checked
  address while TLS SNI, certificate verification and the ``Host`` header stay on the hostname.
  There is no second resolution, so DNS rebinding (public at check, private at connect) fails.

``ALLOW_PRIVATE_NETWORKS=true`` (tests, single-machine setups) turns the address checks off; the
scheme check and pinning stay.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Mapping
from typing import Any, BinaryIO
from urllib.parse import urljoin, urlsplit

import requests
from requests.adapters import HTTPAdapter

from inference_server import net_errors
from inference_server.errors import InputFetchFailed, InputTooLarge, UnsafeURL
from inference_server.netfailures import (
    TRANSIENT_STATUSES,
    TransientFetchError,
    retry_after,
    transient,
)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
ALLOWED_SCHEMES = frozenset({"http", "https"})
MAX_REDIRECTS = 5


def _as_ip(host: str) -> IPAddress | None:
    """The address a literal host denotes, legacy inet_aton forms included (0x7f.1, 2130706433)."""
    host = host.strip("[]")
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        pass
    if host and all(c in "0123456789abcdefxABCDEFX." for c in host) and any(c.isdigit() for c in host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def is_public(ip: IPAddress) -> bool:
    """True when the address is globally routable (IPv4-mapped, 6to4 and NAT64 judged by the IPv4 inside)."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return is_public(ip.ipv4_mapped)
        if ip.sixtofour is not None:
            return is_public(ip.sixtofour)
        if ip in ipaddress.ip_network("64:ff9b::/96"):
            return is_public(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return ip.is_global and not ip.is_multicast


def split_url(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of an http(s) URL; raises ``UnsafeURL`` for any other scheme or no host."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UnsafeURL(f"invalid URL: {exc}") from exc
    scheme = parts.scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        raise UnsafeURL(f"only http and https URLs are allowed, not {scheme or 'no scheme'!r}")
    host = parts.hostname
    if not host:
        raise UnsafeURL("the URL has no host")
    return scheme, host, port or (443 if scheme == "https" else 80)


def check_url(url: str, *, allow_private: bool) -> None:
    """Refuse, without any network access, a URL that is certainly unsafe. Raises ``UnsafeURL``."""
    _, host, _ = split_url(url)
    if allow_private:
        return
    name = host.rstrip(".").lower()
    if name == "localhost" or name.endswith(".localhost"):
        raise UnsafeURL(f"{host} is a loopback name")
    ip = _as_ip(host)
    if ip is not None and not is_public(ip):
        raise UnsafeURL(f"{host} is not a public address")


def resolve_checked(host: str, port: int, allow_private: bool) -> list[IPAddress]:
    """Resolve ``host`` once; every address must be public unless ``allow_private``. Raises ``UnsafeURL``.

    A network failure while resolving raises ``OSError`` (``socket.gaierror``): the caller decides
    whether that is a retryable failure."""
    literal = _as_ip(host)
    if literal is not None:
        addresses: list[IPAddress] = [literal]
    else:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses = []
        for info in infos:
            ip = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
            if ip not in addresses:
                addresses.append(ip)
        if not addresses:
            raise OSError(f"{host} has no address")
    if not allow_private:
        # Every address, not just the first: a name with one public and one private record is refused.
        bad = [str(ip) for ip in addresses if not is_public(ip)]
        if bad:
            raise UnsafeURL(f"{host} resolves to a non-public address ({', '.join(bad)})")
    return addresses


class PinnedAdapter(HTTPAdapter):
    """Sends a request whose URL names the checked IP; TLS SNI and certificate checks use the Host header."""

    def build_connection_pool_key_attributes(self, request, verify, cert=None):  # type: ignore[no-untyped-def]
        host_params, pool_kwargs = super().build_connection_pool_key_attributes(request, verify, cert)
        if host_params["scheme"] == "https":
            hostname = urlsplit("//" + request.headers["Host"]).hostname
            pool_kwargs["server_hostname"] = hostname
            pool_kwargs["assert_hostname"] = hostname
        return host_params, pool_kwargs


def new_adapter(pool_maxsize: int = 10) -> PinnedAdapter:
    """An adapter to share between threads; its connection pools are keyed by (IP, port, hostname)."""
    return PinnedAdapter(pool_connections=pool_maxsize, pool_maxsize=pool_maxsize, max_retries=0)


def pinned_request(
    adapter: PinnedAdapter,
    method: str,
    url: str,
    *,
    allow_private: bool,
    timeout: float,
    headers: Mapping[str, str] | None = None,
    data: bytes | None = None,
    verify: bool | str = True,
) -> requests.Response:
    """One request, no redirects followed, connected to the address that was checked.

    The response is streamed (read ``.raw`` or ``iter_content``, then ``close()``). No cookies, no
    proxies from the environment (a proxy would resolve the name again). ``verify`` is a CA bundle
    path or True (the system store); certificates are always checked for https. Raises ``UnsafeURL``,
    ``OSError`` from resolution, or ``requests.RequestException``."""
    scheme, host, port = split_url(url)
    ip = resolve_checked(host, port, allow_private)[0]
    parts = urlsplit(url)
    ip_host = f"[{ip}]" if ip.version == 6 else str(ip)
    default_port = 443 if scheme == "https" else 80
    netloc = ip_host if port == default_port else f"{ip_host}:{port}"
    host_header = host if port == default_port else f"{host}:{port}"
    if ":" in host:  # an IPv6 literal keeps its brackets in the Host header
        host_header = f"[{host}]" if port == default_port else f"[{host}]:{port}"
    pinned_url = parts._replace(netloc=netloc, fragment="").geturl()
    all_headers = {"Host": host_header, **(headers or {})}
    prepared = requests.Request(method, pinned_url, headers=all_headers, data=data).prepare()
    return adapter.send(prepared, stream=True, timeout=timeout, verify=verify)


def _read_capped(response: requests.Response, max_bytes: int, into: BinaryIO | None = None) -> bytes:
    declared = response.headers.get("Content-Length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise InputTooLarge(f"input is {declared} bytes, over the limit of {max_bytes}")
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_content(1024 * 1024 if into else 64 * 1024):
        size += len(chunk)
        if size > max_bytes:
            raise InputTooLarge(f"input is over the limit of {max_bytes} bytes")
        if into is not None:
            into.write(chunk)
        else:
            chunks.append(chunk)
    return b"".join(chunks)


def fetch_url(
    url: str,
    *,
    allow_private: bool,
    timeout: float,
    max_bytes: int,
    adapter: PinnedAdapter | None = None,
    into: BinaryIO | None = None,
) -> bytes:
    """GET ``url`` and return its body (or, with ``into``, stream it there and return ``b""``).

    Redirects are followed, at most ``MAX_REDIRECTS``, and each target is checked and pinned like
    the first URL (CDNs and presigned storage URLs redirect, so refusing them would refuse real
    inputs); a redirect from https down to http is refused unless ``allow_private``. The body is
    capped while streaming. Raises ``UnsafeURL`` (private or bad scheme),
    ``InputTooLarge`` (over ``max_bytes``), ``TransientFetchError`` (network error, timeout, 5xx,
    429: worth another try) or ``InputFetchFailed`` (any other non-2xx)."""
    owned = adapter is None
    adapter = adapter or new_adapter(1)
    try:
        for _ in range(MAX_REDIRECTS + 1):
            try:
                response = pinned_request(
                    adapter,
                    "GET",
                    url,
                    allow_private=allow_private,
                    timeout=timeout,
                    headers={"Accept": "image/*, */*;q=0.5", "User-Agent": "inference-server"},
                )
            except UnsafeURL:
                raise
            except (OSError, requests.RequestException) as exc:
                failed = TransientFetchError if transient(exc) else InputFetchFailed
                raise failed(f"could not fetch {_redact(url)}: {net_errors.reason(exc)}") from exc
            with response:
                if response.is_redirect and response.headers.get("Location"):
                    target = urljoin(url, response.headers["Location"])
                    if not allow_private and url[:6].lower() == "https:" and target[:5].lower() == "http:":
                        raise UnsafeURL(f"{_redact(url)} redirects from https to plain http")
                    url = target
                    continue
                if not 200 <= response.status_code < 300:
                    message = f"fetching {_redact(url)} returned HTTP {response.status_code}"
                    if response.status_code in TRANSIENT_STATUSES:
                        raise TransientFetchError(message, retry_after=retry_after(response))
                    raise InputFetchFailed(message)
                try:
                    return _read_capped(response, max_bytes, into)
                except requests.RequestException as exc:
                    why = net_errors.reason(exc)
                    raise TransientFetchError(f"could not read {_redact(url)}: {why}") from exc
        raise InputFetchFailed(f"more than {MAX_REDIRECTS} redirects fetching {_redact(url)}")
    finally:
        if owned:
            adapter.close()


def _redact(url: str) -> str:
    """The URL without query string or credentials (presigned URLs carry secrets in the query)."""
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return parts._replace(netloc=netloc, query="", fragment="").geturl()


def describe(exc: Any) -> str:
    """A short, single-line description of a network error for delivery records, which tenants
    read: the exception's class and the plain reason, never its text (pool reprs, addresses)."""
    return f"{type(exc).__name__}: {net_errors.reason(exc)}"
