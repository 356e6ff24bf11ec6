"""The webhook transport on real sockets: whole-attempt deadline against a trickling receiver, TLS on
the hostname while connected to the checked address, keep-alive reuse and a stale connection."""

from __future__ import annotations

import http.server
import socket
import ssl
import threading
import time
from pathlib import Path

import pytest

from inference_server.errors import UnsafeURL
from tests.test_netguard import Echo, serve, tls_echo_server
from webhooks.delivery import attempt
from webhooks.secrets import new_secret
from webhooks.transport import PinnedPool


def trickling_server() -> tuple[socket.socket, int]:
    """Answers the status line at once, then one header byte every 0.2 s, forever."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def serve_one() -> None:
        conn, _ = listener.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\n")
        try:
            for _ in range(100):
                conn.sendall(b"X")
                time.sleep(0.2)
        except OSError:
            pass
        conn.close()

    threading.Thread(target=serve_one, daemon=True).start()
    return listener, listener.getsockname()[1]


def test_a_trickling_receiver_is_cut_off_at_the_deadline() -> None:
    listener, port = trickling_server()
    pool = PinnedPool()
    t0 = time.monotonic()
    result = attempt(
        pool, f"http://127.0.0.1:{port}/hook", "msg_1", b"{}", [new_secret()], allow_private=True, timeout=1.0
    )
    elapsed = time.monotonic() - t0
    listener.close()
    assert result.status_code is None and "Timeout" in (result.error or "")
    assert 0.9 < elapsed < 1.6, elapsed


def test_unsafe_and_unreachable_urls_are_results_not_exceptions() -> None:
    pool = PinnedPool()
    unsafe = attempt(pool, "http://localhost:9/x", "m", b"{}", [new_secret()], allow_private=False, timeout=1)
    assert unsafe.unsafe and unsafe.error.startswith("unsafe_url")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    refused = attempt(
        pool, f"http://127.0.0.1:{port}/", "m", b"{}", [new_secret()], allow_private=True, timeout=1
    )
    assert refused.status_code is None and "Connection" in refused.error
    with pytest.raises(UnsafeURL):
        pool.post("ftp://example.com/", b"", {}, allow_private=True, timeout=1)


def test_tls_is_checked_on_the_hostname(tmp_path: Path) -> None:
    with tls_echo_server(tmp_path) as (ca, port, sni):
        pool = PinnedPool(ssl.create_default_context(cafile=str(ca)))
        answer = pool.post(f"https://localhost:{port}/hook", b"{}", {}, allow_private=True, timeout=5)
        assert answer.status == 200 and answer.body == f"localhost:{port}".encode()
        assert sni == ["localhost"]
        with pytest.raises(ssl.SSLCertVerificationError):  # the certificate does not name the address
            pool.post(f"https://127.0.0.1:{port}/hook", b"{}", {}, allow_private=True, timeout=5)
        with pytest.raises(ssl.SSLCertVerificationError):  # and the system store does not trust the test CA
            PinnedPool().post(f"https://localhost:{port}/hook", b"{}", {}, allow_private=True, timeout=5)


def test_keep_alive_reuse_and_a_stale_connection() -> None:
    connections: list[int] = []

    class Handler(Echo):
        timeout = 0.2  # the server drops idle keep-alive connections after 0.2 s

        def setup(self) -> None:
            super().setup()
            connections.append(1)

    server = serve(http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler))
    url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    try:
        pool = PinnedPool()
        for _ in range(5):
            assert pool.post(url, b"{}", {}, allow_private=True, timeout=5).status == 200
        assert len(connections) == 1  # one connection for five requests
        time.sleep(0.5)  # the server closes it; the pool does not know yet
        assert pool.post(url, b"{}", {}, allow_private=True, timeout=5).status == 200
        assert len(connections) == 2
    finally:
        server.shutdown()
        server.server_close()


def test_a_long_answer_is_capped_and_the_connection_dropped() -> None:
    Echo.routes = {"/big": (200, {}, b"z" * 200_000)}
    server = serve(http.server.ThreadingHTTPServer(("127.0.0.1", 0), Echo))
    try:
        answer = PinnedPool().post(
            f"http://127.0.0.1:{server.server_address[1]}/big",
            b"{}",
            {},
            allow_private=True,
            timeout=5,
            max_response_bytes=1000,
        )
        assert answer.status == 200 and len(answer.body) == 1000
    finally:
        Echo.routes = {}
        server.shutdown()
        server.server_close()


def test_connects_to_the_checked_address_with_the_name_in_host(monkeypatch: pytest.MonkeyPatch) -> None:
    server = serve(http.server.ThreadingHTTPServer(("127.0.0.1", 0), Echo))
    port = server.server_address[1]
    real = socket.getaddrinfo
    lookups: list[str] = []

    def rebinding_dns(host, port_, *args, **kwargs):  # type: ignore[no-untyped-def]
        if host == "127.0.0.1":
            return real(host, port_, *args, **kwargs)
        lookups.append(host)  # first answer loopback (allowed here), any later one an address that is dead
        ip = "127.0.0.1" if len(lookups) == 1 else "192.0.2.1"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port_))]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding_dns)
    try:
        pool = PinnedPool()
        for _ in range(3):
            answer = pool.post(f"http://rebind.test:{port}/hook", b"{}", {}, allow_private=True, timeout=5)
            assert answer.status == 200 and answer.body == f"rebind.test:{port}".encode()
        assert lookups == ["rebind.test"]
        with pytest.raises(UnsafeURL):  # the same name is refused when private addresses are not allowed
            pool.post(f"http://rebind.test:{port}/hook", b"{}", {}, allow_private=False, timeout=5)
    finally:
        server.shutdown()
        server.server_close()
