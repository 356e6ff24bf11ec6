"""Input URLs get bounded retries: a real local HTTP server that fails the first requests (5xx,
429, dropped connections) then serves the image; 4xx is not tried again; every failure ends as
``input_fetch_failed`` with a clean message, within the overall timeout."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from inference_server.devtools.services import free_port
from inference_server.errors import InputFetchFailed
from inference_server.imaging import resolve_input
from tests.test_imaging_inputs import png_bytes

IMAGE = png_bytes((20, 10))


class FlakyServer:
    """Answers request n (from 1) with ``answer(n)``: a status and headers, or None to drop the
    connection without a response; 200 serves the image. Records when each request came."""

    def __init__(self, answer: Callable[[int], tuple[int, dict[str, str]] | None]) -> None:
        self.times: list[float] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                server.times.append(time.monotonic())
                reply = answer(len(server.times))
                if reply is None:
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                status, headers = reply
                body = IMAGE if status == 200 else b"nope"
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.http.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}/in.png"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    @property
    def requests(self) -> int:
        return len(self.times)

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def flaky() -> Iterator[Callable[..., FlakyServer]]:
    servers: list[FlakyServer] = []

    def make(answer: Callable[[int], tuple[int, dict[str, str]] | None]) -> FlakyServer:
        servers.append(FlakyServer(answer))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


def fetch(url: str, *, timeout: float = 10.0, attempts: int = 3) -> bytes:
    def no_storage(ref: str) -> bytes:
        raise AssertionError(ref)

    return resolve_input(
        url,
        read_storage=no_storage,
        allow_private=True,
        timeout=timeout,
        max_bytes=1 << 20,
        attempts=attempts,
    )


def clean(message: str) -> None:
    for leak in (" object at ", "HTTPConnection", "Errno", "Max retries", "urllib3"):
        assert leak not in message, message


@pytest.mark.parametrize(
    "failure",
    [(503, {}), (500, {}), (502, {}), (429, {}), None],
    ids=["503", "500", "502", "429", "dropped-connection"],
)
def test_transient_failures_are_retried_until_the_image_comes(flaky, failure) -> None:  # type: ignore[no-untyped-def]
    server = flaky(lambda n: failure if n <= 2 else (200, {}))
    assert fetch(server.url) == IMAGE
    assert server.requests == 3
    gaps = [b - a for a, b in zip(server.times, server.times[1:], strict=False)]
    assert gaps[0] >= 0.25 and gaps[1] >= 0.5  # backing off: half a second, then a second, jittered


def test_a_client_error_is_not_retried(flaky) -> None:  # type: ignore[no-untyped-def]
    server = flaky(lambda n: (404, {}))
    with pytest.raises(InputFetchFailed) as info:
        fetch(server.url)
    assert server.requests == 1
    assert info.value.code == "input_fetch_failed"
    assert info.value.message == f"fetching {server.url} returned HTTP 404"


def test_retries_are_bounded_by_attempts(flaky) -> None:  # type: ignore[no-untyped-def]
    server = flaky(lambda n: (503, {}))
    with pytest.raises(InputFetchFailed) as info:
        fetch(server.url, attempts=3)
    assert server.requests == 3
    assert info.value.message == f"fetching {server.url} returned HTTP 503 (after 3 attempts)"


def test_retries_stay_within_the_overall_timeout(flaky) -> None:  # type: ignore[no-untyped-def]
    """Retry-After asks for more than the budget has left: no try is made that cannot finish."""
    server = flaky(lambda n: (503, {"Retry-After": "5"}))
    start = time.monotonic()
    with pytest.raises(InputFetchFailed):
        fetch(server.url, timeout=3.0, attempts=5)
    assert server.requests == 1 and time.monotonic() - start < 1


def test_a_silent_server_costs_the_timeout_once_not_per_attempt() -> None:
    silent = socket.create_server(("127.0.0.1", 0))  # accepts (the kernel does), never answers
    try:
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/in.png"
        start = time.monotonic()
        with pytest.raises(InputFetchFailed) as info:
            fetch(url, timeout=2.0, attempts=5)
        took = time.monotonic() - start
    finally:
        silent.close()
    assert took < 3.5, took
    assert "timed out waiting for the response" in info.value.message
    clean(info.value.message)


def test_a_refused_connection_is_retried_then_reported_cleanly() -> None:
    url = f"http://127.0.0.1:{free_port()}/in.png"
    with pytest.raises(InputFetchFailed) as info:
        fetch(url, attempts=2)
    assert info.value.message == f"could not fetch {url}: the connection was refused (after 2 attempts)"
    clean(info.value.message)
