"""Why a fetch failed, and whether trying again may help: for input URLs (and other outbound
requests) a failure must end as a clean message and a decision, not an exception's repr."""

from __future__ import annotations

import os
import socket

import requests

from inference_server.errors import InputFetchFailed


class TransientFetchError(InputFetchFailed):
    """A fetch failure that another try may get past: the network, a timeout, a 5xx, a 429."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


TRANSIENT_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


def transient(exc: BaseException) -> bool:
    """Whether another try may succeed. A certificate the server presents or a URL that cannot be
    parsed stays so on the next try."""
    return not isinstance(exc, requests.exceptions.SSLError | requests.exceptions.InvalidURL)


def retry_after(response: requests.Response) -> float | None:
    """The seconds of a ``Retry-After`` header (the HTTP-date form is ignored)."""
    value = response.headers.get("Retry-After", "")
    return float(value) if value.isdigit() else None


def network_reason(exc: BaseException) -> str:
    """What went wrong on the network, in words: no exception reprs, no addresses of objects."""
    if isinstance(exc, socket.gaierror):
        return "the host name could not be resolved"
    if isinstance(exc, requests.exceptions.SSLError):
        return "the TLS connection failed (certificate or handshake)"
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return "timed out connecting"
    if isinstance(exc, requests.exceptions.ReadTimeout):
        return "timed out waiting for the server"
    if isinstance(exc, requests.exceptions.ChunkedEncodingError | requests.exceptions.ContentDecodingError):
        return "the response was cut short or malformed"
    code = _errno_in(exc)
    if code:
        return os.strerror(code).lower()
    if isinstance(exc, requests.exceptions.ConnectionError):
        return "the connection failed"
    return type(exc).__name__


def _errno_in(exc: BaseException, depth: int = 0) -> int | None:
    """The errno of the OSError under ``exc``, found through the causes urllib3 and requests wrap."""
    if depth > 6:
        return None
    if isinstance(exc, OSError) and isinstance(exc.errno, int) and exc.errno:
        return exc.errno
    inner = [getattr(exc, "reason", None), exc.__cause__, exc.__context__, *exc.args]
    for nested in inner:
        if isinstance(nested, BaseException):
            found = _errno_in(nested, depth + 1)
            if found:
                return found
    return None
