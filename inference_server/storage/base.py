"""The storage interface and the factory that picks a backend from ``STORAGE_URL``."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

from inference_server.errors import ConfigurationError, StorageError
from inference_server.settings import Settings


class Storage(Protocol):
    """A flat key space under one root URI."""

    root: str

    def put(self, key: str, data: bytes, content_type: str) -> str:
        """Write ``data`` under ``key``; return the object's URI."""
        ...

    def get(self, uri: str) -> bytes:
        """Read an object this storage wrote (or any URI under its root)."""
        ...

    def presigned_url(self, uri: str, expires: int) -> str | None:
        """A URL a client can fetch directly, or None where the API should stream the bytes itself."""
        ...

    def owns(self, uri: str) -> bool:
        """Whether ``uri`` lies under this storage's root (user-supplied URIs outside it are refused)."""
        ...

    def download_tree(self, uri: str, dest: Path) -> Path:
        """Copy a folder (a model, a LoRA) under ``uri`` into ``dest`` and return the local path."""
        ...

    def delete(self, uris: list[str]) -> None:
        """Remove these objects (under this storage's root); ones already gone are fine."""
        ...


def output_key(job_id: str, index: int, ext: str) -> str:
    return f"jobs/{job_id}/outputs/{index}.{ext}"


def preview_key(job_id: str) -> str:
    """The job's latest preview, overwritten by each new one."""
    return f"jobs/{job_id}/preview.png"


def uri_of(storage: Storage, key: str) -> str:
    """The URI ``storage.put(key, ...)`` returns, without writing."""
    return f"{storage.root.rstrip('/')}/{key}"


def input_key(job_id: str, name: str, ext: str) -> str:
    return f"jobs/{job_id}/inputs/{name}.{ext}"


def open_storage(settings: Settings) -> Storage:
    """The storage backend for ``settings.storage_url``."""
    url = settings.storage_url
    scheme = urlparse(url).scheme
    if scheme == "file":
        from inference_server.storage.local import FileStorage

        return FileStorage(url)
    if scheme in ("s3", "gs"):
        from inference_server.storage.s3 import S3Storage

        endpoint = settings.s3_endpoint_url
        if scheme == "gs":  # GCS through its S3-compatible XML API (HMAC keys); Google's endpoint by default
            endpoint = endpoint or "https://storage.googleapis.com"
        return S3Storage(
            url,
            endpoint_url=endpoint,
            region=settings.s3_region,
            scheme=scheme,
            connect_timeout=settings.storage_connect_timeout,
            read_timeout=settings.storage_read_timeout,
            max_attempts=settings.storage_max_attempts,
        )
    raise ConfigurationError(
        f"STORAGE_URL must start with file://, s3:// or gs://, got {url!r}", code="invalid_storage_url"
    )


__all__ = ["Storage", "StorageError", "input_key", "open_storage", "output_key"]
