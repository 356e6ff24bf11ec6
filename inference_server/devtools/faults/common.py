"""What every part of the fault harness needs: free ports, bounded waits, and a last-resort cleanup
that stops whatever the harness started even when a run dies half-way."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import pwd
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger("faults")
ROOT = Path(__file__).resolve().parents[3]  # the repository: processes of the system start here

_cleanups: list[Callable[[], None]] = []
_cleanup_lock = threading.Lock()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], T], timeout: float, *, interval: float = 0.1, what: str) -> T:
    """The first truthy value of ``predicate()``, or TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def on_exit(fn: Callable[[], None]) -> Callable[[], None]:
    """Run ``fn`` when the interpreter exits unless ``forget(fn)`` was called first (the normal path
    stops what it started itself; this catches the runs that did not get there)."""
    with _cleanup_lock:
        _cleanups.append(fn)
    return fn


def forget(fn: Callable[[], None]) -> None:
    with _cleanup_lock, contextlib.suppress(ValueError):
        _cleanups.remove(fn)


@atexit.register
def _run_cleanups() -> None:
    with _cleanup_lock:
        pending = list(reversed(_cleanups))
        _cleanups.clear()
    for fn in pending:
        try:
            fn()
        except Exception:  # one failed cleanup must not keep the next from running
            log.exception("cleanup failed")


def interrupt_on_sigterm() -> None:
    """Make SIGTERM (``timeout``, a CI runner giving up) stop the run as Ctrl-C does, so cleanups
    run; Python's default for SIGTERM exits without them and would leave the private servers up."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) in (
        signal.SIG_DFL,
        None,
    ):
        signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def as_user(user: str) -> list[str]:
    """The command prefix that runs a program as ``user`` (the services refuse to run as root)."""
    if os.geteuid() == 0:
        return ["runuser", "-u", user, "--"]
    if pwd.getpwuid(os.geteuid()).pw_name == user:
        return []
    raise PermissionError(f"the harness must run as root or as {user!r} to start a private server")


def chown(path: Path, user: str) -> None:
    if os.geteuid() == 0:
        entry = pwd.getpwnam(user)
        os.chown(path, entry.pw_uid, entry.pw_gid)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie has exited: only its parent's wait() is missing.
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
            return False
    return True


def children(pid: int) -> list[int]:
    """The direct children of ``pid`` (Linux)."""
    with contextlib.suppress(OSError):
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
        return [int(p) for p in text.split()]
    return []
