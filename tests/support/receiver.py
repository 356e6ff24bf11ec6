"""The webhook receiver of the tests: a real HTTP/1.1 server on loopback that records every request
and answers as the test says."""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Received:
    """One request as the receiver read it."""

    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    body: bytes
    at: float  # time.monotonic() on arrival

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def type(self) -> str:
        """The webhook's event type (``job.succeeded``, ...)."""
        return str(self.json()["type"])


# The answer to the n-th request (from 0): status, headers, and seconds to wait before answering.
Behaviour = Callable[[int, Received], tuple[int, dict[str, str], float]]


def accept(n: int, request: Received) -> tuple[int, dict[str, str], float]:
    return 204, {}, 0.0


class Receiver:
    """Listens on ``url`` from construction until ``close()`` (or the end of a ``with`` block).

    ``behaviour`` decides each answer and may be replaced while the receiver runs. A delayed answer
    holds only its own connection: requests are served on threads of their own."""

    def __init__(self, behaviour: Behaviour = accept) -> None:
        self.behaviour = behaviour
        self.requests: list[Received] = []
        self._lock = threading.Lock()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the dispatcher's pool expects

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                headers = {k.lower(): v for k, v in self.headers.items()}
                request = Received(self.command, self.path, headers, body, time.monotonic())
                n = receiver._record(request)
                status, extra, delay = receiver.behaviour(n, request)
                if delay:
                    time.sleep(delay)
                self.send_response(status)
                for name, value in extra.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_PATCH = do_PUT = do_POST  # noqa: N815

            def log_message(self, *args: object) -> None:
                pass

        return Handler

    def _record(self, request: Received) -> int:
        with self._lock:
            self.requests.append(request)
            return len(self.requests) - 1

    def events(self, job_id: str | None = None) -> list[Received]:
        """The webhooks received so far, in arrival order; only ``job_id``'s if given."""
        with self._lock:
            received = list(self.requests)
        return [r for r in received if job_id is None or r.json()["data"]["id"] == job_id]

    def types(self, job_id: str | None = None) -> list[str]:
        """The event types of ``events(job_id)``."""
        return [r.type for r in self.events(job_id)]

    def ids(self) -> list[str]:
        """The ``webhook-id`` of every request, in arrival order."""
        return [r.headers["webhook-id"] for r in self.events()]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> Receiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
