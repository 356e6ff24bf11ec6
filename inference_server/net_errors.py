"""Plain words for network failures, safe to show a client.

requests, urllib3 and botocore put pool reprs, ``<... object at 0x...>``, internal host names and
retry counters in their messages. ``reason`` walks an exception's causes and names the root
failure ("the connection was refused", "timed out connecting") without any of that; the full
exception belongs in the log. Classes are matched by name where they live in optional libraries
(botocore), so this module imports none of them.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator

_CONNECT_TIMEOUTS = {"ConnectTimeout", "ConnectTimeoutError"}  # requests, urllib3 and botocore
_READ_TIMEOUTS = {"ReadTimeout", "ReadTimeoutError"}
_BROKEN_RESPONSES = {"ChunkedEncodingError", "ProtocolError", "IncompleteRead"}


def causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, then everything it wraps: ``__cause__``, ``__context__``, urllib3's ``reason`` and
    exceptions passed as arguments (requests wraps urllib3's error that way)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        wrapped = getattr(current, "reason", None)
        todo.append(wrapped if isinstance(wrapped, BaseException) else None)
        todo += [current.__cause__, current.__context__]
        todo += [a for a in current.args if isinstance(a, BaseException)]


def reason(exc: BaseException) -> str:
    """A short lower-case phrase for why a network operation failed."""
    chain = list(causes(exc))
    names = {type(x).__name__ for x in chain}

    def has(kind: type[BaseException]) -> bool:
        return any(isinstance(x, kind) for x in chain)

    # Most specific first: a refused connection is also wrapped in urllib3's NewConnectionError,
    # which is a subclass of its connect-timeout error.
    if has(socket.gaierror):
        return "the host name could not be resolved"
    if has(ConnectionRefusedError):
        return "the connection was refused"
    if has(ssl.SSLCertVerificationError):
        return "the server's TLS certificate could not be verified"
    if has(ssl.SSLError):
        return "the TLS handshake failed"
    if names & _CONNECT_TIMEOUTS:
        return "timed out connecting"
    if names & _READ_TIMEOUTS or has(TimeoutError):
        return "timed out waiting for the response"
    if "RemoteDisconnected" in names:  # a ConnectionResetError too, but says more
        return "the server closed the connection without a response"
    if has(ConnectionResetError) or has(BrokenPipeError) or has(ConnectionAbortedError):
        return "the connection was reset"
    if names & _BROKEN_RESPONSES:
        return "the connection broke off during the response"
    for x in chain:
        if isinstance(x, OSError) and isinstance(x.strerror, str) and x.strerror:
            return x.strerror[0].lower() + x.strerror[1:]  # the C library's words: "no route to host"
    if any("Connection" in n or "Endpoint" in n for n in names):
        return "could not connect"
    return "a network error occurred"
