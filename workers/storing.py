"""Storing outputs in a process of the worker child's own.

The finisher (workers/finisher.py) stores a job's outputs while the next job denoises. On its
thread, signing, encoding, hashing and the storage client's request building are Python that holds
the interpreter lock, and the denoising loop, which takes the lock back between every two kernels
it launches, waits for it each time: the device idles in small gaps through every upload. Here
that work runs in a separate process, started once per child (spawned: it never loads torch), so
the denoising thread shares its lock only with the finisher's short database writes.

The finisher's thread still decides everything (cancels, the lease, the record of success); this
process only turns images into stored objects and their output rows. If it dies, the job in hand
is released as after a storage failure (``storage_unavailable``: queued again, its attempt
counted), and the next job starts a new process. It reads its requests from a pipe only the child
writes to, so it exits when the child is gone, however the child ended.

A plain subprocess (``python -m workers.storing``) with pickled frames on its stdin and stdout:
a Celery prefork child is a daemonic process, which ``multiprocessing`` does not let start one."""

from __future__ import annotations

import logging
import os
import pickle
import struct
import subprocess
import sys
import threading
from typing import IO, TYPE_CHECKING, Any

from inference_server.errors import StorageUnavailable
from workers.outputs import ToStore

if TYPE_CHECKING:
    from PIL import Image

    from inference_server.jobs.spec import JobSpec
    from inference_server.settings import Settings
    from workers.outputs import Extras

log = logging.getLogger(__name__)

_HEADER = struct.Struct("!Q")  # the length of the pickled frame that follows


class StoringProcess:
    """``store`` runs workers.outputs.store_outputs in the storing process and returns its rows;
    its errors are raised here as they were raised there. One call at a time."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> StoringProcess:
        """Start the process now and wait until it is ready, so the first job does not pay for it."""
        with self._lock:
            self._call(("ready",))
        return self

    def store(
        self, job_id: str, spec: JobSpec, images: list[Image.Image], extras: Extras | None = None
    ) -> list[dict[str, Any]]:
        """One job's output rows (workers.outputs.store_outputs); raises its error."""
        (result,) = self.store_all([ToStore(job_id, spec, images, extras)])
        if isinstance(result, Exception):
            raise result
        return result

    def store_all(self, jobs: list[ToStore]) -> list[list[dict[str, Any]] | Exception]:
        """workers.outputs.store_all in the storing process: each job's rows, or its error."""
        plain = [ToStore(j.job_id, j.spec, j.images, j.extras.plain() if j.extras else None) for j in jobs]
        with self._lock:
            results: list[list[dict[str, Any]] | Exception] = self._call(("store", plain))
            return results

    def close(self) -> None:
        """Stop the process (it has stored what it was given: calls are answered in turn)."""
        with self._lock:
            proc, self._proc = self._proc, None
        if proc is not None:
            _stop(proc)

    def _call(self, request: tuple[Any, ...]) -> Any:
        proc = self._proc or self._spawn()
        assert proc.stdin is not None and proc.stdout is not None
        try:
            _write(proc.stdin, request)
            answer = _read(proc.stdout)
        except (OSError, EOFError, pickle.UnpicklingError) as exc:
            self._proc = None
            _stop(proc)
            reason = type(exc).__name__
            log.error("the storing process stopped (%s); a new one starts with the next job", reason)
            raise StorageUnavailable("the worker's storing process stopped; the job is queued again") from exc
        kind, value = answer
        if kind == "error":
            raise value
        return value

    def _spawn(self) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "workers.storing"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert proc.stdin is not None
        _write(proc.stdin, self.settings)
        self._proc = proc
        return proc


def _stop(proc: subprocess.Popen[bytes]) -> None:
    try:
        if proc.stdin is not None:
            proc.stdin.close()  # its end of input: it exits
        proc.wait(timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        proc.kill()
        proc.wait()


def _write(stream: IO[bytes], value: Any) -> None:
    data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def _read(stream: IO[bytes]) -> Any:
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        raise EOFError("the other side closed the pipe")
    size = _HEADER.unpack(header)[0]
    data = stream.read(size)
    if len(data) < size:
        raise EOFError("the other side closed the pipe")
    return pickle.loads(data)


# -- in the storing process ----------------------------------------------------------------------


def main() -> None:
    """Answer the child's requests until its pipe closes."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a worker's Ctrl-C is its child's to handle
    requests = sys.stdin.buffer
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything printed goes to the worker's stderr, not into the answers
    from inference_server.logs import configure_logging
    from inference_server.storage import open_storage
    from workers.outputs import store_all

    try:
        settings = _read(requests)
    except EOFError:
        return
    configure_logging(settings.log_format, settings.log_level, role="worker")
    storage = open_storage(settings)
    while True:
        try:
            request = _read(requests)
        except EOFError:
            return
        try:
            if request[0] == "ready":
                answer: tuple[str, Any] = ("ok", True)
            else:
                answer = ("ok", [_picklable(r) for r in store_all(settings, storage, request[1])])
        except Exception as exc:  # raised again in the child, as if it had stored the job itself
            answer = ("error", exc)
        try:
            _write(answers, answer)
        except (pickle.PicklingError, TypeError, AttributeError):
            error = answer[1]
            _write(answers, ("error", RuntimeError(f"{type(error).__name__}: {error}")))  # as a bug


def _picklable(result: Any) -> Any:
    """An error that cannot cross the pipe comes back as a plain one with its text (a bug)."""
    if not isinstance(result, Exception):
        return result
    try:
        pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:
        return RuntimeError(f"{type(result).__name__}: {result}")
    return result


if __name__ == "__main__":
    main()
