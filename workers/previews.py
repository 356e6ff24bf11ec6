"""A running job's latest preview, handed from the denoising loop to the progress thread: the loop
only swaps a reference (``offer``); the progress thread encodes and uploads it (``take``, ``store``)
and records ``job.preview``, so previews never wait on storage or the database inside the loop."""

from __future__ import annotations

import io
import threading
from typing import Any

from PIL import Image

from inference_server.storage.base import Storage, preview_key


class LatestPreview:
    def __init__(self, storage: Storage, job_id: str) -> None:
        self.storage = storage
        self.job_id = job_id
        self._latest: tuple[int, Any] | None = None
        self._lock = threading.Lock()

    def offer(self, step: int, rgb: Any) -> None:
        """The engine's preview callback: keep the newest (an older one not yet taken is dropped)."""
        with self._lock:
            self._latest = (step, rgb)

    def take(self) -> tuple[int, Any] | None:
        """The newest preview offered since the last ``take``, if any: (step, RGB array)."""
        with self._lock:
            latest, self._latest = self._latest, None
        return latest

    def store(self, rgb: Any) -> str:
        """Encode ``rgb`` (uint8, h x w x 3) as PNG over the job's previous preview; return its URI."""
        buf = io.BytesIO()
        Image.fromarray(rgb, "RGB").save(buf, "PNG")
        return self.storage.put(preview_key(self.job_id), buf.getvalue(), "image/png")
