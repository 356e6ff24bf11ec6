"""The system's real processes (`inference-server api|worker|dispatcher`) and the moto S3 server,
started for a scenario, killed the ways scenarios kill them, and always stopped in the end."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import requests

from inference_server.devtools.faults.common import (
    ROOT,
    children,
    forget,
    free_port,
    on_exit,
    wait_until,
)


class Proc:
    """One process (and its process group) with its output in ``log``. ``expected_exit`` is set by
    whoever stops or kills it on purpose; any other exit is a death the tally counts."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log = log_dir / f"{name}-{uuid.uuid4().hex[:6]}.log"
        self.expected_exit = False
        self.proc = subprocess.Popen(
            args,
            env=env,
            cwd=ROOT,
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group: killpg reaches the worker's pool children too
        )
        self._cleanup = on_exit(self.stop)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def died(self) -> bool:
        """Exited although nobody meant it to."""
        return not self.alive() and not self.expected_exit

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.text().splitlines()[-n:])

    def children(self) -> list[int]:
        return children(self.pid)

    def signal_main(self, sig: int) -> None:
        """``sig`` to the main process only (its children may outlive it, as they do in production)."""
        self.expected_exit = True
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)

    def signal_children(self, sig: int) -> list[int]:
        pids = self.children()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        return pids

    def kill(self) -> None:
        """SIGKILL the whole group at once: no chance to ack, record or clean up."""
        self.expected_exit = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM, then SIGKILL after ``timeout``; also reaps what is left of the group."""
        forget(self._cleanup)
        self.expected_exit = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)


def cli(name: str, args: list[str], env: dict[str, str], log_dir: Path) -> Proc:
    return Proc(name, [sys.executable, "-m", "inference_server.cli.main", *args], env, log_dir)


def start_api(env: dict[str, str], log_dir: Path) -> tuple[Proc, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    return cli("api", ["api", "--port", str(port)], dict(env, API_URL=url), log_dir), url


def wait_api(proc: Proc, url: str, timeout: float = 60) -> None:
    def up() -> bool:
        if not proc.alive():
            raise RuntimeError(f"the API exited:\n{proc.tail()}")
        try:
            return requests.get(f"{url}/healthz", timeout=1).ok
        except requests.RequestException:
            return False

    wait_until(up, timeout, interval=0.1, what="the API")


def start_worker(env: dict[str, str], log_dir: Path, families: str = "sd15") -> Proc:
    """A CPU worker. Two workers on one broker need different ``families`` strings (the string is
    part of the Celery node name, which must be unique): e.g. ``sd15`` and ``sd15,sdxl``."""
    return cli("worker", ["worker", "--families", families, "--device", "cpu"], env, log_dir)


def wait_worker(proc: Proc, timeout: float = 90) -> None:
    def ready() -> bool:
        if not proc.alive():
            raise RuntimeError(f"the worker exited:\n{proc.tail()}")
        return "ready." in proc.text()

    wait_until(ready, timeout, interval=0.2, what="the worker")


def start_dispatcher(env: dict[str, str], log_dir: Path) -> Proc:
    return cli("dispatcher", ["dispatcher"], dict(env, DISPATCHER_METRICS_PORT="0"), log_dir)


def start_moto(log_dir: Path) -> tuple[Proc, str]:
    """moto in server mode: a real S3 endpoint spoken to over HTTP."""
    port = free_port()
    proc = Proc(
        "moto",
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        dict(os.environ),
        log_dir,
    )
    endpoint = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return requests.get(endpoint, timeout=1).status_code < 500
        except requests.RequestException:
            return False

    wait_until(up, 60, what="the moto S3 server")
    return proc, endpoint
