"""Files on a local (or shared network) disk."""

from __future__ import annotations

import errno
import os
import tempfile
from contextlib import suppress
from pathlib import Path
from urllib.parse import unquote, urlparse

from inference_server.errors import NotFound, StorageError, StorageFull, StorageReadOnly, StorageUnavailable

FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
# As root, permission bits do not stop a write: EACCES and EPERM then mean a mount or an ACL that does.
READ_ONLY = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})


def write_error(exc: OSError, what: str) -> StorageError:
    """The storage error for a failed write, with the system's reason and no path of the host."""
    reason = os.strerror(exc.errno) if exc.errno else type(exc).__name__
    message = f"could not write {what} to file storage: {reason}"
    if exc.errno in FULL:
        return StorageFull(message)
    if exc.errno in READ_ONLY:
        return StorageReadOnly(message)
    return StorageUnavailable(message)  # EIO, ESTALE, ENOTCONN: a disk or a network mount gone bad


class FileStorage:
    def __init__(self, root_url: str) -> None:
        self.base = Path(unquote(urlparse(root_url).path)).resolve()
        try:
            self.base.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise write_error(exc, f"the storage root {self.base}") from exc
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
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Write then rename: a reader never sees half a file, and a retry simply replaces it.
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        except OSError as exc:
            raise write_error(exc, key) from exc
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except OSError as exc:
            with suppress(OSError):
                os.unlink(tmp)  # a half-written file on a full disk only makes it fuller
            raise write_error(exc, key) from exc
        return path.as_uri()

    def get(self, uri: str) -> bytes:
        path = self._path(uri)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise NotFound(f"{uri} does not exist") from exc
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno else type(exc).__name__
            raise StorageUnavailable(f"could not read {uri} from file storage: {reason}") from exc

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
                raise write_error(exc, uri) from exc

    def download_tree(self, uri: str, dest: Path) -> Path:
        src = self._path(uri)
        if not src.exists():
            raise NotFound(f"{uri} does not exist")
        return src  # already local: use in place
