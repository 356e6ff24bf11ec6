"""The ingress's small HTTP side port: ``/metrics`` (Prometheus), ``/healthz`` (the process answers)
and ``/readyz`` (consuming, and the last database write went through)."""

from __future__ import annotations

import http.server
import json
import threading

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest


class Health:
    """What ``/readyz`` reports; the consumer sets it."""

    def __init__(self) -> None:
        self.consuming = False
        self.database_ok = True
        self.detail = "starting"

    @property
    def ready(self) -> bool:
        return self.consuming and self.database_ok


def serve(port: int, health: Health, host: str = "0.0.0.0") -> http.server.ThreadingHTTPServer:
    """Serve the probes and metrics on ``port`` from a daemon thread; returns the server."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                self._send(200, b'{"status":"ok"}', "application/json")
            elif path == "/readyz":
                status = 200 if health.ready else 503
                body = {"status": "ready" if health.ready else "not ready", "detail": health.detail}
                self._send(status, json.dumps(body).encode(), "application/json")
            else:
                self._send(404, b'{"error":"not found"}', "application/json")

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="ingress-health", daemon=True).start()
    return server
