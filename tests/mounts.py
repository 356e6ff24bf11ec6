"""A file system that fails the way real disks do, for the storage tests: tmpfs mounts that are
tiny (ENOSPC) or read-only (EROFS). Permission bits would not do: the tests run as root."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def tmpfs(options: str) -> Iterator[Path]:
    """A tmpfs mounted with ``options`` (``size=64k``) on a new directory, unmounted afterwards."""
    where = Path(tempfile.mkdtemp(prefix="is-tmpfs-"))
    command = ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)]
    done = subprocess.run(command, capture_output=True, check=False)
    if done.returncode != 0:
        shutil.rmtree(where, ignore_errors=True)
        pytest.fail(f"these tests mount a tmpfs (as root): {done.stderr.decode().strip()}", pytrace=False)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)
        shutil.rmtree(where, ignore_errors=True)


def read_only(where: Path) -> None:
    """Remount a tmpfs of ``tmpfs`` read-only."""
    subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True)
