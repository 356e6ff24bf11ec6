"""The API's edge: what every request passes before a route sees it.

Two refusals live here because a route cannot make them well: a body over ``MAX_REQUEST_BYTES``
(counted as it arrives, so a chunked body with no ``Content-Length`` is held to the same limit) and
text that no later layer can store (a NUL byte, which PostgreSQL refuses in text, or an unpaired
UTF-16 surrogate, which has no UTF-8 form) in the path, the query, a header, or a JSON or form
body. Every route gets both, new ones included."""

from __future__ import annotations

import json
import re
import time
from typing import Any
from urllib.parse import unquote_to_bytes

from fastapi import HTTPException

from api.errors import error_response
from api.metrics import ApiMetrics

# After json.loads a valid surrogate pair is one code point, so any surrogate left is unpaired.
UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


class EdgeRefusal(HTTPException):
    """Raised from inside ``receive``: FastAPI lets an HTTPException from the body read through
    unchanged, and ``api.errors`` answers it with ``code``."""

    def __init__(self, code: str, message: str, status: int) -> None:
        super().__init__(status_code=status, detail=message)
        self.code = code


def _bad_encoded(where: str, raw: bytes) -> str | None:
    """Whether percent-encoded ``raw`` (a path, a query, a form body) decodes to unstorable text."""
    decoded = unquote_to_bytes(raw.replace(b"+", b" "))
    if b"\x00" in decoded:
        return f"the {where} holds a NUL character"
    try:
        decoded.decode("utf-8")  # strict: an encoded lone surrogate is not valid UTF-8 either
    except UnicodeDecodeError:
        return f"the {where} is not valid UTF-8 once percent-decoded"
    return None


def _bad_text(scope: Any) -> str | None:
    """Where the request's path, query or headers hold unstorable text, else None."""
    raw_path = scope.get("raw_path") or scope.get("path", "").encode("utf-8", "surrogatepass")
    for where, raw in (("path", raw_path), ("query string", scope.get("query_string", b""))):
        problem = _bad_encoded(where, raw)
        if problem:
            return problem
    for name, value in scope.get("headers", ()):
        if b"\x00" in value:
            return f"the header {name.decode('latin-1')!r} holds a NUL character"
    return None


def _bad_json(body: bytes) -> str | None:
    """Where a JSON body holds unstorable text after decoding, else None. Only an escape (``\\u``)
    can produce such text, so the common body is not parsed twice."""
    if b"\\u" not in body:
        return None
    try:
        doc = json.loads(body)
    except ValueError:
        return None  # not JSON: the route's own parsing refuses it with its code
    stack = [doc]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if UNSTORABLE.search(item):
                return "the JSON body holds a NUL character or an unpaired surrogate"
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


def _body_kind(scope: Any) -> str | None:
    """``json`` or ``form`` for the bodies whose text is checked (the ones parsed into strings)."""
    for name, value in scope.get("headers", ()):
        if name == b"content-type":
            value = value.lower()
            if b"json" in value:
                return "json"
            if value.startswith(b"application/x-www-form-urlencoded"):
                return "form"
    return None


def _bad_body(kind: str, body: bytes) -> str | None:
    return _bad_json(body) if kind == "json" else _bad_encoded("form body", body)


class LimitsAndTiming:
    """Plain ASGI middleware (cheaper than BaseHTTPMiddleware on the submit hot path): the edge's
    refusals above, and the timing of every request for /metrics."""

    def __init__(
        self, app: Any, *, max_bytes: int, metrics: ApiMetrics, path_limits: dict[str, int] | None = None
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.metrics = metrics
        self.path_limits = path_limits or {}  # exact paths allowed a larger body (uploads)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._refuse_early(scope)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        start = time.perf_counter()
        status = [500]

        async def send_wrapper(message: Any) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, self._counting(scope, receive), send_wrapper)
        finally:
            route = scope.get("route")
            self.metrics.requests.labels(
                scope["method"], getattr(route, "path", "unmatched"), str(status[0])
            ).observe(time.perf_counter() - start)

    def _limit(self, scope: Any) -> int:
        return self.path_limits.get(scope.get("path", ""), self.max_bytes)

    def _refuse_early(self, scope: Any) -> Any:
        limit = self._limit(scope)
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                return error_response("request_too_large", self._limit_message(limit))
        problem = _bad_text(scope)
        return error_response("invalid_characters", problem) if problem else None

    def _limit_message(self, limit: int) -> str:
        return f"requests are limited to {limit} bytes"

    def _counting(self, scope: Any, receive: Any) -> Any:
        """``receive``, refusing once more than the limit has arrived and checking a JSON or form
        body's text when its last chunk is in."""
        received = 0
        limit = self._limit(scope)
        kind = _body_kind(scope)
        keep: list[bytes] | None = [] if kind else None

        async def wrapped() -> Any:
            nonlocal received
            message = await receive()
            if message["type"] != "http.request":
                return message
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > limit:
                raise EdgeRefusal("request_too_large", self._limit_message(limit), 413)
            if keep is not None:
                keep.append(chunk)
                if not message.get("more_body", False):
                    problem = _bad_body(kind or "json", b"".join(keep))
                    if problem:
                        raise EdgeRefusal("invalid_characters", problem, 400)
            return message

        return wrapped
