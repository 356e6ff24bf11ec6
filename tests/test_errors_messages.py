"""Messages a client reads never carry internals: no object reprs (``<_io.BytesIO object at 0x...>``),
no urllib3 pool text, no botocore endpoint strings, no server paths or bucket names. Each bad input
goes through the real path: the running API, a real socket, a real TLS server, the moto S3 server."""

from __future__ import annotations

import base64
import errno
import socket
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from inference_server.errors import InputFetchFailed, StorageError
from inference_server.imaging import resolve_input
from inference_server.storage.local import FileStorage, write_error
from inference_server.storage.s3 import S3Storage
from tests.test_netguard import tls_echo_server

# What leaks look like: object reprs, urllib3's pool and retry text, botocore's endpoint text.
LEAKS = ("0x", "<", "object at", "Pool(", "Max retries", "Caused by", "endpoint URL", "Errno")

PNG_MAGIC, JPEG_MAGIC = b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"
WEBP_JUNK = b"RIFF" + struct.pack("<I", 40) + b"WEBP" + b"junk" * 10


def assert_clean(message: str) -> None:
    assert not [leak for leak in LEAKS if leak in message], message


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


@pytest.mark.parametrize(
    "data,code",
    [
        # Pillow's own words for the first three: "cannot identify image file <_io.BytesIO object at 0x...>".
        (PNG_MAGIC, "corrupt_image"),
        (JPEG_MAGIC + b"junk" * 10, "corrupt_image"),
        (WEBP_JUNK, "corrupt_image"),
        (PNG_MAGIC + b"junk" * 10, "truncated_image"),
        (b"plain text, not an image", "not_an_image"),
    ],
)
def test_a_broken_image_posted_to_the_api_is_a_clean_400(api_client, data: bytes, code: str) -> None:  # type: ignore[no-untyped-def]
    body = {"family": "sd15", "task": "img2img", "prompt": "x", "image": data_uri(data)}
    job = api_client.post(f"{api_client.base_url}/v1/jobs", json=body, timeout=30)
    assert job.status_code == 400, job.text
    assert job.json()["error"]["code"] == code
    assert_clean(job.json()["error"]["message"])
    upload = api_client.post(f"{api_client.base_url}/v1/uploads", files={"file": ("x.png", data)}, timeout=30)
    assert upload.status_code == 400 and upload.json()["error"]["code"] == code, upload.text
    assert_clean(upload.json()["error"]["message"])


def test_a_data_uri_with_non_ascii_base64_is_a_clean_400(api_client) -> None:  # type: ignore[no-untyped-def]
    body = {"family": "sd15", "task": "img2img", "prompt": "x", "image": "data:image/png;base64,AAé="}
    resp = api_client.post(f"{api_client.base_url}/v1/jobs", json=body, timeout=30)
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_data_uri", resp.text
    assert "codec" not in resp.json()["error"]["message"]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def tcp_server(handle) -> Iterator[int]:  # type: ignore[no-untyped-def]
    """A listening socket on 127.0.0.1 whose connections ``handle(conn)`` treats as it likes."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            held.append(conn)
            handle(conn)

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield server.getsockname()[1]
    finally:
        server.close()
        for conn in held:
            conn.close()


def no_storage(ref: str) -> bytes:
    raise AssertionError(f"a URL input must not be read from storage: {ref}")


def fetch_failure(url: str, timeout: float = 5.0) -> str:
    with pytest.raises(InputFetchFailed) as exc:
        resolve_input(url, read_storage=no_storage, allow_private=True, timeout=timeout, max_bytes=1 << 20)
    assert exc.value.code == "input_fetch_failed"
    assert_clean(exc.value.message)
    return exc.value.message


def test_input_fetch_failures_say_why_in_plain_words(tmp_path: Path) -> None:
    port = closed_port()
    assert fetch_failure(f"https://127.0.0.1:{port}/in.png") == (
        f"could not fetch https://127.0.0.1:{port}/in.png: the connection was refused (after 3 attempts)"
    )
    with tls_echo_server(tmp_path) as (_ca, tls_port, _sni):  # a CA this process does not trust
        assert fetch_failure(f"https://localhost:{tls_port}/in.png").endswith(
            "the server's TLS certificate could not be verified"
        )
    with tcp_server(lambda conn: (conn.recv(65536), conn.close())) as hangup:  # reads, answers nothing
        assert fetch_failure(f"http://127.0.0.1:{hangup}/in.png").endswith(
            "the server closed the connection without a response (after 3 attempts)"
        )
    with tcp_server(lambda conn: None) as silent:
        assert "timed out waiting for the response" in fetch_failure(
            f"http://127.0.0.1:{silent}/in.png", timeout=0.5
        )


def test_webhook_attempt_errors_name_the_reason_not_the_exception_text() -> None:
    from webhooks.delivery import attempt
    from webhooks.secrets import new_secret
    from webhooks.transport import PinnedPool

    url = f"http://127.0.0.1:{closed_port()}/hook"
    result = attempt(PinnedPool(), url, "m", b"{}", [new_secret()], allow_private=True, timeout=2)
    assert result.error == "ConnectionRefusedError: the connection was refused"


def test_s3_failures_name_no_bucket_and_no_botocore_text(s3_endpoint: str) -> None:
    missing = S3Storage("s3://no-such-bucket-for-errors/p", endpoint_url=s3_endpoint, region="us-east-1")
    with pytest.raises(StorageError) as write:
        missing.put("jobs/1/outputs/0.png", b"x", "image/png")
    assert "no-such-bucket" not in write.value.message and "NoSuchBucket" in write.value.message
    down = S3Storage("s3://b/p", endpoint_url=f"http://127.0.0.1:{closed_port()}", region="us-east-1")
    with pytest.raises(StorageError) as read:
        down.get("s3://b/p/jobs/1/outputs/0.png")
    assert read.value.code == "storage_unavailable" and "127.0.0.1" not in read.value.message
    assert "could not connect" in read.value.message and "botocore" not in read.value.message


def test_file_storage_failures_name_no_server_path(tmp_path: Path) -> None:
    storage = FileStorage((tmp_path / "root").as_uri())
    (tmp_path / "root" / "jobs").write_text("a file where a folder should be")
    with pytest.raises(StorageError) as exc:
        storage.put("jobs/1/outputs/0.png", b"x", "image/png")
    assert exc.value.code == "storage_unavailable" and str(tmp_path) not in exc.value.message
    assert "not a directory" in exc.value.message.lower()
    # The disk-full and read-only cases, as the operating system reports them, get their own codes.
    full = write_error(OSError(errno.ENOSPC, "No space left on device"), "jobs/1/outputs/0.png")
    read_only = write_error(OSError(errno.EROFS, "Read-only file system"), "jobs/1/outputs/0.png")
    assert full.code == "storage_full" and "no space left on device" in full.message.lower()
    assert read_only.code == "storage_read_only" and "read-only file system" in read_only.message.lower()
