"""Storage failures get storage codes, with clean messages: a full and a read-only file system
(tmpfs mounts), S3 refusing a write (moto enforcing IAM), an S3
endpoint that is closed, stopped, failing with 5xx or silent (bounded retries, then
``storage_unavailable``)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from inference_server.devtools.services import free_port
from inference_server.errors import NotFound, StorageError
from inference_server.storage.local import FileStorage
from inference_server.storage.s3 import S3Storage
from tests.mounts import read_only, tmpfs
from tests.support.waiting import wait_for

KEY = "jobs/j1/outputs/0.png"


def assert_clean(exc: StorageError, code: str) -> None:
    """The code, and a message without host paths, endpoint URLs, errno tuples or object reprs."""
    assert exc.code == code, (exc.code, exc.message)
    for leak in ("Errno", "OSError", "botocore", "http://", "127.0.0.1", " object at ", "/tmp/"):
        assert leak not in exc.message, exc.message


# -- file storage -------------------------------------------------------------------------------


def test_a_full_file_system_is_storage_full_and_leaves_no_partial_file() -> None:
    with tmpfs("size=64k") as root:
        storage = FileStorage(root.as_uri())
        with pytest.raises(StorageError) as info:
            storage.put(KEY, os.urandom(256 * 1024), "image/png")
        assert_clean(info.value, "storage_full")
        assert KEY in info.value.message and "No space left on device" in info.value.message
        assert [p.name for p in root.rglob("*") if p.is_file()] == []  # the temporary file is gone
        assert storage.get(storage.put(KEY, b"small", "image/png")) == b"small"  # and its space with it


def test_a_read_only_file_system_is_storage_read_only() -> None:
    with tmpfs("size=1m") as root:
        storage = FileStorage(root.as_uri())
        uri = storage.put(KEY, b"before", "image/png")
        read_only(root)
        with pytest.raises(StorageError) as info:
            storage.put("jobs/j2/outputs/0.png", b"after", "image/png")
        assert_clean(info.value, "storage_read_only")
        assert "Read-only file system" in info.value.message
        assert storage.get(uri) == b"before"  # reads still work
        with pytest.raises(StorageError) as info:
            FileStorage((root / "elsewhere").as_uri())  # a root that cannot be created
        assert info.value.code == "storage_read_only"


def test_a_missing_file_is_not_found(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path.as_uri())
    with pytest.raises(NotFound):
        storage.get((tmp_path / "jobs" / "nope.png").as_uri())


# -- S3 -----------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def aws_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests must be signed, even for moto; a test may switch to other keys."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")


def s3(endpoint: str, bucket: str = "bucket", **kw: Any) -> S3Storage:
    return S3Storage(f"s3://{bucket}/outputs", endpoint_url=endpoint, region="us-east-1", **kw)


def start_moto(tmp_path: Path, **env: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=dict(os.environ, **env),
        stdout=(tmp_path / f"moto-{port}.log").open("wb"),
        stderr=subprocess.STDOUT,
    )

    def listening() -> bool:
        try:
            socket.create_connection(
                ("127.0.0.1", port), timeout=1
            ).close()  # not a request: IAM counts those
            return True
        except OSError:
            return False

    wait_for(listening, 30, what="moto server")
    return proc, f"http://127.0.0.1:{port}"


def test_s3_refusing_a_write_is_storage_read_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """moto enforcing IAM: a key allowed to read but not to write gets AccessDenied on put."""
    import boto3

    proc, endpoint = start_moto(tmp_path, INITIAL_NO_AUTH_ACTION_COUNT="3")
    try:
        anonymous = {"endpoint_url": endpoint, "region_name": "us-east-1"}
        iam = boto3.client("iam", aws_access_key_id="x", aws_secret_access_key="x", **anonymous)
        keys = {}
        for user, actions in (("admin", "*"), ("reader", ["s3:GetObject", "s3:ListBucket"])):
            if user == "reader":
                iam = boto3.client("iam", **keys["admin"], **anonymous)
            iam.create_user(UserName=user)
            key = iam.create_access_key(UserName=user)["AccessKey"]
            keys[user] = {
                "aws_access_key_id": key["AccessKeyId"],
                "aws_secret_access_key": key["SecretAccessKey"],
            }
            policy = {
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}],
            }
            iam.put_user_policy(UserName=user, PolicyName="p", PolicyDocument=json.dumps(policy))
        admin = boto3.client("s3", **keys["admin"], **anonymous)
        admin.create_bucket(Bucket="bucket")
        admin.put_object(Bucket="bucket", Key="outputs/old.png", Body=b"old")

        for name, value in keys["reader"].items():
            monkeypatch.setenv(name.upper(), value)
        storage = s3(endpoint)
        with pytest.raises(StorageError) as info:
            storage.put(KEY, b"png", "image/png")
        assert_clean(info.value, "storage_read_only")
        assert "AccessDenied" in info.value.message
        assert storage.get("s3://bucket/outputs/old.png") == b"old"
        with pytest.raises(NotFound):
            storage.get("s3://bucket/outputs/missing.png")
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_closed_endpoint_is_storage_unavailable_after_bounded_retries() -> None:
    storage = s3(f"http://127.0.0.1:{free_port()}", connect_timeout=1, max_attempts=3)
    start = time.monotonic()
    with pytest.raises(StorageError) as info:
        storage.put(KEY, b"png", "image/png")
    assert_clean(info.value, "storage_unavailable")
    assert "could not connect to the storage endpoint" in info.value.message
    assert time.monotonic() - start < 15


def test_a_stopped_moto_is_storage_unavailable(tmp_path: Path) -> None:
    import boto3

    proc, endpoint = start_moto(tmp_path)
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="bucket")
    storage = s3(endpoint, connect_timeout=1, max_attempts=2)
    uri = storage.put(KEY, b"png", "image/png")
    proc.terminate()
    proc.wait(10)
    for call in (lambda: storage.put(KEY, b"png", "image/png"), lambda: storage.get(uri)):
        with pytest.raises(StorageError) as info:
            call()
        assert_clean(info.value, "storage_unavailable")


class FailingEndpoint:
    """A real HTTP server in the place of an S3 endpoint, answering every request with one S3
    error (status and code), or not at all (``status=None``); it counts the requests."""

    def __init__(self, status: int | None, code: str = "") -> None:
        self.requests = 0
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_PUT(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers.get("content-length", 0)))
                endpoint.requests += 1
                if status is None:
                    time.sleep(10)
                    return
                body = f"<Error><Code>{code}</Code><Message>no</Message></Error>".encode()
                self.send_response(status)
                self.send_header("content-type", "application/xml")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize(
    ("status", "code", "expected", "tries"),
    [
        (503, "ServiceUnavailable", "storage_unavailable", 3),  # retried, then given up
        (500, "InternalError", "storage_unavailable", 3),
        (507, "XMinioStorageFull", "storage_full", 1),  # not retried: waiting frees no space
        (403, "QuotaExceeded", "storage_full", 1),  # Ceph RGW's quota answer
        (403, "AccessDenied", "storage_read_only", 1),
        (400, "InvalidArgument", "storage_error", 1),
    ],
)
def test_s3_error_answers_get_their_codes(status: int, code: str, expected: str, tries: int) -> None:
    endpoint = FailingEndpoint(status, code)
    try:
        with pytest.raises(StorageError) as info:
            s3(endpoint.url, max_attempts=3).put(KEY, b"png", "image/png")
    finally:
        endpoint.close()
    assert_clean(info.value, expected)
    assert code in info.value.message
    assert endpoint.requests == tries


def test_a_silent_endpoint_times_out_into_storage_unavailable() -> None:
    endpoint = FailingEndpoint(None)
    start = time.monotonic()
    try:
        with pytest.raises(StorageError) as info:
            s3(endpoint.url, read_timeout=1, max_attempts=2).put(KEY, b"png", "image/png")
    finally:
        endpoint.close()
    assert_clean(info.value, "storage_unavailable")
    assert "did not answer in time" in info.value.message
    assert endpoint.requests == 2 and time.monotonic() - start < 8


def test_open_storage_passes_the_limits_on() -> None:
    from inference_server.settings import Settings
    from inference_server.storage import open_storage

    settings = Settings(
        storage_url=f"s3://b-{uuid.uuid4().hex[:6]}/p",
        s3_endpoint_url="http://127.0.0.1:9",
        storage_connect_timeout=2.5,
        storage_read_timeout=7.0,
        storage_max_attempts=6,
    )
    storage = open_storage(settings)
    config = storage.client.meta.config  # type: ignore[attr-defined]
    assert (config.connect_timeout, config.read_timeout) == (2.5, 7.0)
    assert config.retries == {"total_max_attempts": 6, "mode": "standard"}


def test_small_uploads_skip_the_continue_handshake_and_large_ones_keep_it(s3_endpoint: str) -> None:
    """An image is sent with its headers (``Expect: 100-continue`` would cost a round trip to the
    store before the body leaves); a body over the threshold still waits for the go-ahead. Both
    arrive whole."""
    import boto3

    from inference_server.storage.s3 import EXPECT_CONTINUE_ABOVE

    bucket = f"expect-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    store = s3(s3_endpoint, bucket)
    sent: dict[str, str | None] = {}

    def seen(request, **_: Any) -> None:  # type: ignore[no-untyped-def]
        sent[request.url.rsplit("/", 1)[1]] = request.headers.get("Expect")

    store.client.meta.events.register("before-send.s3.PutObject", seen)  # runs after the store's own
    small, large = os.urandom(300_000), os.urandom(EXPECT_CONTINUE_ABOVE + 1)
    for name, body in (("small.png", small), ("large.png", large)):
        uri = store.put(name, body, "image/png")
        assert store.get(uri) == body
    assert sent == {"small.png": None, "large.png": b"100-continue"}, sent
