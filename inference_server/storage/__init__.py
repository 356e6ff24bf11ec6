"""Where job inputs and outputs live: ``file://``, ``s3://`` (AWS, MinIO, R2, GCS interop) or ``gs://``.

Keys are derived from the job id and output index, so a retried job overwrites its files."""

from __future__ import annotations

from inference_server.storage.base import Storage, open_storage, output_key

__all__ = ["Storage", "open_storage", "output_key"]
