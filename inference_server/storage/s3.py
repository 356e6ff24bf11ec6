"""S3 and S3-compatible object stores (MinIO, R2, GCS interop) through boto3.

Every request has connect and read timeouts and botocore's standard retries (exponential backoff
with jitter on connection errors, timeouts, 5xx and throttling); what still fails becomes a
``StorageError`` with a code of its own, and a message that names the object and the reason,
never botocore's text (which carries the endpoint URL and object reprs)."""

from __future__ import annotations

import logging
from pathlib import Path
from urllib.parse import urlparse

import boto3
from botocore import exceptions as bex
from botocore.config import Config

from inference_server.errors import NotFound, StorageError, StorageFull, StorageReadOnly, StorageUnavailable

log = logging.getLogger(__name__)

MISSING = frozenset({"NoSuchKey", "404", "NotFound"})
# No quota error in AWS itself; these are MinIO's, Ceph RGW's and the HTTP status for it.
FULL = frozenset({"QuotaExceeded", "XMinioStorageFull", "XMinioAdminBucketQuotaExceeded", "507"})
DENIED = frozenset({"AccessDenied", "AllAccessDisabled", "403"})
BAD_CREDENTIALS = frozenset({"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"})
NETWORK_REASONS: list[tuple[type[Exception], str]] = [
    (bex.ConnectTimeoutError, "timed out connecting to the storage endpoint"),
    (bex.ReadTimeoutError, "the storage endpoint did not answer in time"),
    (bex.EndpointConnectionError, "could not connect to the storage endpoint"),
    (bex.ConnectionClosedError, "the storage endpoint closed the connection"),
    (bex.NoCredentialsError, "no storage credentials are configured"),
]
# Below this, an upload goes without ``Expect: 100-continue``: botocore adds it to every upload, and
# waiting for the server's go-ahead costs a round trip before the body leaves, which doubles an
# image's upload time to a distant store. Refusing a small body before it is sent saves nothing
# worth a round trip (the Go SDK's threshold is the same).
EXPECT_CONTINUE_ABOVE = 2 * 1024 * 1024


def _no_continue_for_small_bodies(request, **_: object) -> None:  # type: ignore[no-untyped-def]
    """botocore's ``before-send`` hook: the header is not signed, so dropping it here is safe."""
    length = request.headers.get("Content-Length")
    if length is not None and int(length) <= EXPECT_CONTINUE_ABOVE:
        request.headers.pop("Expect", None)


def storage_error(exc: Exception, *, action: str, uri: str, writing: bool) -> Exception:
    """The domain error for a failed boto3 call (``NotFound`` for a missing object). Messages name
    the object's key, not the bucket: they reach clients in a failed job's error."""
    uri = _object_key(uri)
    if isinstance(exc, bex.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code") or "")
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        attempts = 1 + int(exc.response.get("ResponseMetadata", {}).get("RetryAttempts") or 0)
        what = f"{action} of {uri} failed: {code or 'HTTP error'} (HTTP {status})"
        if code in MISSING and not writing:
            return NotFound(f"{uri} does not exist")
        if code in FULL or status == 507:
            return StorageFull(what)
        if code in DENIED and writing:
            return StorageReadOnly(what)
        if code in DENIED or code in BAD_CREDENTIALS or code == "NoSuchBucket" or status >= 500:
            return StorageUnavailable(f"{what} after {attempts} attempt{'s' * (attempts > 1)}")
        return StorageError(what)
    reason = next((text for cls, text in NETWORK_REASONS if isinstance(exc, cls)), None)
    return StorageUnavailable(f"{action} of {uri} failed: {reason or f'{type(exc).__name__}'}")


def _object_key(uri: str) -> str:
    """``s3://bucket/prefix/key`` → ``prefix/key``."""
    scheme, _, rest = uri.partition("://")
    return rest.partition("/")[2] or rest if scheme in ("s3", "gs") else uri


class S3Storage:
    def __init__(
        self,
        root_url: str,
        *,
        endpoint_url: str | None,
        region: str,
        scheme: str = "s3",
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        max_attempts: int = 4,
    ) -> None:
        parsed = urlparse(root_url)
        self.scheme = scheme
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.root = f"{scheme}://{self.bucket}/{self.prefix}".rstrip("/")
        # Bounded retries and timeouts: a storage outage fails the job with a code instead of hanging a GPU.
        config = Config(
            retries={"total_max_attempts": max(1, max_attempts), "mode": "standard"},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            signature_version="s3v4",
            s3={"addressing_style": "path"} if endpoint_url else None,
        )
        # A session of its own: boto3's default one keeps the first credentials it resolved.
        session = boto3.session.Session()
        self.client = session.client("s3", endpoint_url=endpoint_url, region_name=region, config=config)
        for operation in ("PutObject", "UploadPart"):
            self.client.meta.events.register(f"before-send.s3.{operation}", _no_continue_for_small_bodies)

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _split(self, uri: str) -> tuple[str, str]:
        parsed = urlparse(uri)
        if parsed.scheme != self.scheme:
            raise StorageError(f"{uri} is not a {self.scheme}:// URI")
        return parsed.netloc, parsed.path.lstrip("/")

    def _fail(self, exc: Exception, *, action: str, uri: str, writing: bool) -> Exception:
        log.warning("%s of %s failed: %r", action, uri, exc)
        return storage_error(exc, action=action, uri=uri, writing=writing)

    def put(self, key: str, data: bytes, content_type: str) -> str:
        full = self._key(key)
        uri = f"{self.scheme}://{self.bucket}/{full}"
        try:
            self.client.put_object(Bucket=self.bucket, Key=full, Body=data, ContentType=content_type)
        except (bex.BotoCoreError, bex.ClientError) as exc:
            raise self._fail(exc, action="upload", uri=uri, writing=True) from exc
        return uri

    def get(self, uri: str) -> bytes:
        bucket, key = self._split(uri)
        try:
            return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except (bex.BotoCoreError, bex.ClientError) as exc:
            raise self._fail(exc, action="download", uri=uri, writing=False) from exc

    def presigned_url(self, uri: str, expires: int) -> str | None:
        bucket, key = self._split(uri)
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=expires
        )

    def owns(self, uri: str) -> bool:
        return uri == self.root or uri.startswith(self.root + "/")

    def delete(self, uris: list[str]) -> None:
        by_bucket: dict[str, list[str]] = {}
        for uri in uris:
            bucket, key = self._split(uri)
            by_bucket.setdefault(bucket, []).append(key)
        for bucket, keys in by_bucket.items():
            for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
                objects = [{"Key": k} for k in keys[start : start + 1000]]
                try:
                    answer = self.client.delete_objects(
                        Bucket=bucket, Delete={"Objects": objects, "Quiet": True}
                    )
                except (bex.BotoCoreError, bex.ClientError) as exc:
                    where = f"{self.scheme}://{bucket}/"
                    raise self._fail(exc, action="delete", uri=where, writing=True) from exc
                errors = answer.get("Errors") or []
                if errors:
                    key, why = errors[0].get("Key"), errors[0].get("Message")
                    raise StorageError(f"delete of {self.scheme}://{bucket}/{key} failed: {why}")

    def download_tree(self, uri: str, dest: Path) -> Path:
        bucket, prefix = self._split(uri)
        prefix = prefix.rstrip("/") + "/"
        dest.mkdir(parents=True, exist_ok=True)
        found = False
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    rel = obj["Key"][len(prefix) :]
                    if not rel or rel.endswith("/"):
                        continue
                    target = (dest / rel).resolve()
                    if not target.is_relative_to(dest.resolve()):
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    if not (target.exists() and target.stat().st_size == obj["Size"]):
                        self.client.download_file(bucket, obj["Key"], str(target))
                    found = True
        except (bex.BotoCoreError, bex.ClientError) as exc:
            raise self._fail(exc, action="download", uri=uri, writing=False) from exc
        if not found:
            raise NotFound(f"{uri} holds no files")
        return dest
