"""The SSRF guard: static refusal at submit, resolution checks, pinning to the checked address
(DNS rebinding fails), TLS checked on the hostname, and the capped input fetch."""

from __future__ import annotations

import datetime as dt
import http.server
import socket
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from inference_server import netguard
from inference_server.errors import InputFetchFailed, InputTooLarge, UnsafeURL

REFUSED = [
    "ftp://example.com/x",
    "file:///etc/passwd",
    "gopher://example.com",
    "http:///nohost",
    "example.com/x",
    "http://127.0.0.1/",
    "http://127.1.2.3:8080/",
    "http://10.0.0.1/",
    "http://172.16.5.4/",
    "http://192.168.1.1/",
    "http://169.254.169.254/latest/meta-data/",
    "http://0.0.0.0/",
    "http://100.64.0.1/",
    "http://[::1]/",
    "http://[fe80::1]/",
    "http://[fc00::1]/",
    "http://[fd12:3456::1]/",
    "http://[::ffff:127.0.0.1]/",
    "http://[::ffff:10.0.0.1]/",
    "http://[::ffff:169.254.169.254]/",
    "http://2130706433/",
    "http://0x7f.1/",
    "http://017700000001/",
    "http://127.1/",
    "http://localhost:8000/",
    "http://api.localhost/",
    "http://[ff02::1]/",
    "http://224.0.0.1/",
    "http://[2002:7f00:1::]/",  # 6to4 wrapping 127.0.0.1
]
ACCEPTED = [
    "https://example.com/hook",
    "http://8.8.8.8:8080/x",
    "https://[2606:4700:4700::1111]/",
    "http://1.1.1.1/",
]


@pytest.mark.parametrize("url", REFUSED)
def test_check_url_refuses(url: str) -> None:
    with pytest.raises(UnsafeURL) as info:
        netguard.check_url(url, allow_private=False)
    assert info.value.code == "unsafe_url"


@pytest.mark.parametrize("url", ACCEPTED)
def test_check_url_accepts_public(url: str) -> None:
    netguard.check_url(url, allow_private=False)


def test_allow_private_keeps_the_scheme_check() -> None:
    netguard.check_url("http://127.0.0.1:9/", allow_private=True)
    netguard.check_url("http://localhost/", allow_private=True)
    with pytest.raises(UnsafeURL):
        netguard.check_url("file:///etc/passwd", allow_private=True)


def test_resolution_checks_every_address() -> None:
    with pytest.raises(UnsafeURL, match="non-public"):
        netguard.resolve_checked("localhost", 80, allow_private=False)
    assert all(ip.is_loopback for ip in netguard.resolve_checked("localhost", 80, allow_private=True))
    with pytest.raises(UnsafeURL):
        netguard.resolve_checked("0x7f000001", 80, allow_private=False)


# -- pinning ------------------------------------------------------------------------------------


class Echo(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    routes: dict[str, tuple[int, dict[str, str], bytes]] = {}

    def do_GET(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length") or 0))  # keep the connection usable
        status, headers, body = self.routes.get(self.path, (200, {}, self.headers.get("Host", "").encode()))
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET  # noqa: N815

    def log_message(self, *args: object) -> None:
        pass


def serve(server: http.server.HTTPServer) -> http.server.HTTPServer:
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def echo() -> Iterator[http.server.ThreadingHTTPServer]:
    server = serve(http.server.ThreadingHTTPServer(("127.0.0.1", 0), Echo))
    yield server
    server.shutdown()
    server.server_close()
    Echo.routes = {}


def test_dns_rebinding_fails(echo, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """The name is resolved once; the connection goes to that address even if DNS changes its answer."""
    port = echo.server_address[1]
    answers = iter(["127.0.0.1"])  # a second lookup would get 192.0.2.1, which answers nothing
    calls: list[str] = []

    real_getaddrinfo = socket.getaddrinfo

    def fake_getaddrinfo(host, port_, *args, **kwargs):  # type: ignore[no-untyped-def]
        if (
            host == "127.0.0.1"
        ):  # a numeric host is no lookup (urllib3 passes the pinned address through here)
            return real_getaddrinfo(host, port_, *args, **kwargs)
        calls.append(host)
        ip = next(answers, "192.0.2.1")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port_))]

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    adapter = netguard.new_adapter()
    response = netguard.pinned_request(
        adapter, "GET", f"http://rebind.test:{port}/", allow_private=True, timeout=5
    )
    assert response.status_code == 200
    assert response.content == f"rebind.test:{port}".encode()  # the Host header keeps the name
    assert calls == ["rebind.test"]


def test_name_resolving_to_private_is_refused_before_connecting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        socket,
        "getaddrinfo",
        lambda host, port, *a, **k: [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.215.14", port)),
            (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::ffff:10.1.2.3", port, 0, 0)),
        ],
    )
    with pytest.raises(UnsafeURL, match="non-public"):
        netguard.pinned_request(
            netguard.new_adapter(), "GET", "http://mixed.test/", allow_private=False, timeout=1
        )


def _tls_files(tmp: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for the name `localhost` only."""
    now = dt.datetime.now(dt.UTC)

    def cert(subject: str, key, issuer: str, issuer_key, ca: bool, san: str | None):  # type: ignore[no-untyped-def]
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(san)]), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key, srv_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_cert = cert("test-ca", ca_key, "test-ca", ca_key, True, None)
    srv_cert = cert("localhost", srv_key, "test-ca", ca_key, False, "localhost")
    pem = serialization.Encoding.PEM
    (tmp / "ca.pem").write_bytes(ca_cert.public_bytes(pem))
    (tmp / "srv.pem").write_bytes(srv_cert.public_bytes(pem))
    (tmp / "srv.key").write_bytes(
        srv_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return tmp / "ca.pem", tmp / "srv.pem", tmp / "srv.key"


@contextmanager
def tls_echo_server(tmp_path: Path) -> Iterator[tuple[Path, int, list[str | None]]]:
    """An HTTPS Echo server on 127.0.0.1 with a certificate for ``localhost`` from a test CA;
    yields the CA file, the port, and the SNI names clients sent."""
    ca, crt, key = _tls_files(tmp_path)
    sni: list[str | None] = []
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(crt, key)
    ctx.sni_callback = lambda sock, name, _ctx: sni.append(name)  # type: ignore[assignment,func-returns-value]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    serve(server)
    try:
        yield ca, server.server_address[1], sni
    finally:
        server.shutdown()
        server.server_close()


def test_tls_uses_the_hostname_for_sni_and_certificate(tmp_path: Path) -> None:
    with tls_echo_server(tmp_path) as (ca, port, seen_sni):
        adapter = netguard.new_adapter()
        ok = netguard.pinned_request(
            adapter, "GET", f"https://localhost:{port}/", allow_private=True, timeout=5, verify=str(ca)
        )
        assert ok.status_code == 200 and ok.content == f"localhost:{port}".encode()
        assert seen_sni[-1] == "localhost"
        # The same server reached by address: the certificate does not name 127.0.0.1, so it is refused.
        with pytest.raises(requests.exceptions.SSLError):
            netguard.pinned_request(
                adapter, "GET", f"https://127.0.0.1:{port}/", allow_private=True, timeout=5, verify=str(ca)
            )
        # And without the test CA, the system store does not trust it.
        with pytest.raises(requests.exceptions.SSLError):
            netguard.pinned_request(
                adapter, "GET", f"https://localhost:{port}/", allow_private=True, timeout=5
            )


# -- fetch_url ----------------------------------------------------------------------------------


def test_fetch_follows_checked_redirects_and_caps_size(echo) -> None:  # type: ignore[no-untyped-def]
    base = f"http://127.0.0.1:{echo.server_address[1]}"
    Echo.routes = {
        "/img": (200, {}, b"x" * 1000),
        "/hop": (302, {"Location": "/img"}, b""),
        "/loop": (302, {"Location": "/loop"}, b""),
        "/to-file": (302, {"Location": "file:///etc/passwd"}, b""),
        "/missing": (404, {}, b"no"),
    }
    assert netguard.fetch_url(f"{base}/hop", allow_private=True, timeout=5, max_bytes=1000) == b"x" * 1000
    with pytest.raises(InputTooLarge):
        netguard.fetch_url(f"{base}/img", allow_private=True, timeout=5, max_bytes=999)
    with pytest.raises(InputFetchFailed, match="redirects"):
        netguard.fetch_url(f"{base}/loop", allow_private=True, timeout=5, max_bytes=1000)
    with pytest.raises(UnsafeURL):  # every hop is checked again
        netguard.fetch_url(f"{base}/to-file", allow_private=True, timeout=5, max_bytes=1000)
    with pytest.raises(InputFetchFailed, match="404"):
        netguard.fetch_url(f"{base}/missing", allow_private=True, timeout=5, max_bytes=1000)
    with pytest.raises(UnsafeURL):
        netguard.fetch_url(f"{base}/img", allow_private=False, timeout=5, max_bytes=1000)


def test_fetch_network_failure_is_input_fetch_failed() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    with pytest.raises(InputFetchFailed):
        netguard.fetch_url(f"http://127.0.0.1:{port}/x", allow_private=True, timeout=2, max_bytes=10)


def test_fetch_caps_a_body_without_content_length() -> None:
    class Chunked(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.end_headers()  # HTTP/1.0 style: the body runs until the connection closes
            for _ in range(100):
                self.wfile.write(b"y" * 1024)

        def log_message(self, *args: object) -> None:
            pass

    server = serve(http.server.ThreadingHTTPServer(("127.0.0.1", 0), Chunked))
    try:
        with pytest.raises(InputTooLarge):
            netguard.fetch_url(
                f"http://127.0.0.1:{server.server_address[1]}/",
                allow_private=True,
                timeout=5,
                max_bytes=10_000,
            )
    finally:
        server.shutdown()
        server.server_close()
