"""A webhook receiver that verifies every request with the independent ``standardwebhooks`` package
and records what it accepted; it can go down (its port closed) and come back on the same URL."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Delivery:
    job_id: str
    type: str
    webhook_id: str
    at: float


class VerifyingReceiver:
    """Answers 200 to a request whose signature verifies with ``secret``, 400 otherwise. ``delay``
    seconds before each answer keep deliveries in flight (the dispatcher-kill scenario)."""

    def __init__(self, secret: str, *, delay: float = 0.0) -> None:
        import standardwebhooks

        self._webhook = standardwebhooks.Webhook(secret)
        self.delay = delay
        self.deliveries: list[Delivery] = []
        self.rejected = 0  # requests whose signature did not verify
        self.in_flight = 0  # requests being answered right now
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self.port = 0
        self.up()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def up(self) -> None:
        """Listen (again, on the same port once it had one)."""
        if self._server is not None:
            return
        handler = self._handler()
        deadline = time.monotonic() + 5
        while True:
            try:
                self._server = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()

    def down(self) -> None:
        """Close the port: deliveries get connection refused until ``up()``."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    close = down

    def terminal_ids(self) -> dict[tuple[str, str], set[str]]:
        """Per (job, terminal event type): the distinct webhook ids received."""
        out: dict[tuple[str, str], set[str]] = {}
        with self._lock:
            for d in self.deliveries:
                if d.type in ("job.succeeded", "job.failed", "job.canceled"):
                    out.setdefault((d.job_id, d.type), set()).add(d.webhook_id)
        return out

    def _record(self, body: bytes, headers: dict[str, str]) -> int:
        try:
            payload: Any = self._webhook.verify(body, headers)
        except Exception:
            with self._lock:
                self.rejected += 1
            return 400
        if isinstance(payload, (bytes, str)):
            payload = json.loads(payload)
        delivery = Delivery(
            str(payload["data"]["id"]), str(payload["type"]), headers["webhook-id"], time.time()
        )
        with self._lock:
            self.deliveries.append(delivery)
        return 200

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        # HTTP/1.0, the default: one request per connection, so no kept-alive connection lets a
        # delivery through while the receiver is down.
        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                if receiver._server is None:
                    self.close_connection = True
                    return  # went down meanwhile: no answer at all
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                headers = {k.lower(): v for k, v in self.headers.items()}
                with receiver._lock:
                    receiver.in_flight += 1
                try:
                    if receiver.delay:
                        time.sleep(receiver.delay)
                    status = receiver._record(body, headers)
                finally:
                    with receiver._lock:
                        receiver.in_flight -= 1
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        return Handler
