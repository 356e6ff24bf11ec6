"""Files on a local (or shared network) disk."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlparse

from inference_server.errors import NotFound, StorageError


class FileStorage:
    def __init__(self, root_url: str) -> None:
        self.base = Path(unquote(urlparse(root_url).path)).resolve()
        self.base.mkdir(parents=True, exist_ok=True)
        self.root = self.base.as_uri()

    def _path(self, uri: str) -> Path:
        path = Path(unquote(urlparse(uri).path)).resolve()
        if not path.is_relative_to(self.base):
            raise StorageError(f"{uri} is outside the storage root")
        return path

    def put(self, key: str, data: bytes, content_type: str) -> str:
        path = (self.base / key).resolve()
        if not path.is_relative_to(self.base):
            raise StorageError(f"key {key!r} escapes the storage root")
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename: a reader never sees half a file, and a retry simply replaces it.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
        return path.as_uri()

    def get(self, uri: str) -> bytes:
        path = self._path(uri)
        try:
            return path.read_bytes()
        except FileNotFoundError as exc:
            raise NotFound(f"{uri} does not exist") from exc

    def presigned_url(self, uri: str, expires: int) -> str | None:
        return None

    def owns(self, uri: str) -> bool:
        try:
            self._path(uri)
        except StorageError:
            return False
        return uri.startswith("file:")

    def delete(self, uris: list[str]) -> None:
        for uri in uris:
            try:
                self._path(uri).unlink(missing_ok=True)
            except OSError as exc:
                raise StorageError(f"could not delete {uri}: {exc}") from exc

    def download_tree(self, uri: str, dest: Path) -> Path:
        src = self._path(uri)
        if not src.exists():
            raise NotFound(f"{uri} does not exist")
        return src  # already local: use in place
