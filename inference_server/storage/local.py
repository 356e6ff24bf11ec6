"""Files on a local (or shared network) disk."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlparse

from inference_server.errors import NotFound, StorageError

log = logging.getLogger(__name__)

# The errors worth their own code: the operator's fix differs (free space, remount, permissions).
_WRITE_CODES = {errno.ENOSPC: "storage_full", errno.EDQUOT: "storage_full", errno.EROFS: "storage_read_only"}


def disk_failure(action: str, path: Path, exc: OSError) -> StorageError:
    """A ``StorageError`` a client may read: the C library's reason, not the server's paths."""
    log.warning("%s %s failed: %s", action, path, exc)
    why = (exc.strerror or type(exc).__name__).lower()
    return StorageError(f"{action} failed: {why}", code=_WRITE_CODES.get(exc.errno or 0, "storage_error"))


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
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Write then rename: a reader never sees half a file, and a retry simply replaces it.
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except OSError as exc:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            raise disk_failure("storage write", path, exc) from exc
        return path.as_uri()

    def get(self, uri: str) -> bytes:
        path = self._path(uri)
        try:
            return path.read_bytes()
        except FileNotFoundError as exc:
            raise NotFound(f"{uri} does not exist") from exc
        except OSError as exc:
            raise disk_failure("storage read", path, exc) from exc

    def presigned_url(self, uri: str, expires: int) -> str | None:
        return None

    def owns(self, uri: str) -> bool:
        try:
            self._path(uri)
        except StorageError:
            return False
        return uri.startswith("file:")

    def download_tree(self, uri: str, dest: Path) -> Path:
        src = self._path(uri)
        if not src.exists():
            raise NotFound(f"{uri} does not exist")
        return src  # already local: use in place
