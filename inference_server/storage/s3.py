"""S3 and S3-compatible object stores (MinIO, R2, GCS interop) through boto3."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from inference_server.errors import NotFound, StorageError


class S3Storage:
    def __init__(self, root_url: str, *, endpoint_url: str | None, region: str, scheme: str = "s3") -> None:
        parsed = urlparse(root_url)
        self.scheme = scheme
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.root = f"{scheme}://{self.bucket}/{self.prefix}".rstrip("/")
        # Bounded retries and timeouts: a storage outage fails the job with a code instead of hanging a GPU.
        config = Config(
            retries={"max_attempts": 5, "mode": "standard"},
            connect_timeout=10,
            read_timeout=60,
            signature_version="s3v4",
            s3={"addressing_style": "path"} if endpoint_url else None,
        )
        self.client = boto3.client("s3", endpoint_url=endpoint_url, region_name=region, config=config)

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _split(self, uri: str) -> tuple[str, str]:
        parsed = urlparse(uri)
        if parsed.scheme != self.scheme:
            raise StorageError(f"{uri} is not a {self.scheme}:// URI")
        return parsed.netloc, parsed.path.lstrip("/")

    def put(self, key: str, data: bytes, content_type: str) -> str:
        full = self._key(key)
        try:
            self.client.put_object(Bucket=self.bucket, Key=full, Body=data, ContentType=content_type)
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"upload to {self.scheme}://{self.bucket}/{full} failed: {exc}") from exc
        return f"{self.scheme}://{self.bucket}/{full}"

    def get(self, uri: str) -> bytes:
        bucket, key = self._split(uri)
        try:
            return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NoSuchBucket"):
                raise NotFound(f"{uri} does not exist") from exc
            raise StorageError(f"download of {uri} failed: {exc}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"download of {uri} failed: {exc}") from exc

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
                except (BotoCoreError, ClientError) as exc:
                    raise StorageError(f"delete in {self.scheme}://{bucket} failed: {exc}") from exc
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
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"download of {uri} failed: {exc}") from exc
        if not found:
            raise NotFound(f"{uri} holds no files")
        return dest
