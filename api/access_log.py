"""One access-log line per request, and a request id on every response.

A client's ``X-Request-ID`` is kept when it is a plausible id (at most 128 characters of letters,
digits and ``._:-``), so a trace can be followed from the caller's own logs; anything else, or none,
gets a fresh one. The id is returned in ``X-Request-ID`` and carried by every line logged while the
request is handled (``request_id``), the access line included. Uvicorn's own access log is off
(``inference-server api``): this line has the route template and the id, which it lacks."""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

from inference_server.logs import job_context

log = logging.getLogger("api.access")

HEADER = b"x-request-id"
VALID_ID = re.compile(rb"[A-Za-z0-9._:\-]{1,128}")


def request_id(scope: Any) -> str:
    """The request's id: the client's own when valid, else a new one."""
    for name, value in scope.get("headers", ()):
        if name == HEADER and VALID_ID.fullmatch(value):
            return value.decode("ascii")
    return uuid.uuid4().hex


class AccessLog:
    """Plain ASGI middleware, outermost, so refusals made by the edge are logged too."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id(scope)
        header = (b"x-request-id", rid.encode("ascii"))
        status = [500]
        start = time.perf_counter()

        async def send_with_id(message: Any) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message["headers"] = [
                    *(h for h in message.get("headers", ()) if h[0].lower() != HEADER),
                    header,
                ]
            await send(message)

        try:
            with job_context(request_id=rid):
                await self.app(scope, receive, send_with_id)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            ms = round((time.perf_counter() - start) * 1000, 2)
            log.info(
                "%s %s %s %.1f ms",
                scope["method"],
                route,
                status[0],
                ms,
                extra={
                    "method": scope["method"],
                    "route": route,
                    "status": status[0],
                    "duration_ms": ms,
                    "request_id": rid,
                },
            )
