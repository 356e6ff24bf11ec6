"""The processes of the system under test: `inference-server` roles started as a user would, each
with its output kept for failure messages."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import uuid
from pathlib import Path

import requests

from inference_server.devtools.services import free_port
from tests.support.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]


def base_env(**extra: str) -> dict[str, str]:
    """This process's environment without any database, broker or storage setting, one thread per
    process, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "BROKER_", "STORAGE_"))}
    env.update(OMP_NUM_THREADS="1", TORCH_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


class Proc:
    """A child process of the system with its log kept for failure messages."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log = log_dir / f"{name}-{uuid.uuid4().hex[:6]}.log"
        self.metrics_url: str | None = None
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "inference_server.cli.main", *args],
            env=env,
            cwd=ROOT,
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.output().splitlines()[-n:])

    def kill(self, sig: int = 9) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait(10)


def cli(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`inference-server ARGS...` run to its end, its output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "inference_server.cli.main", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_api(env: dict[str, str], logs_dir: Path, name: str = "api") -> tuple[Proc, str]:
    """An `inference-server api` on a free port, with ``API_URL`` set to it, returned with its base
    URL once it answers ``/healthz``."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = Proc(name, ["api", "--port", str(port)], dict(env, API_URL=url), logs_dir)

    def ready() -> bool:
        if proc.proc.poll() is not None:
            raise AssertionError(f"API exited:\n{proc.tail()}")
        try:
            return requests.get(f"{url}/healthz", timeout=1).ok
        except requests.RequestException:
            return False

    wait_for(ready, 60, what=f"the API ({name})")
    return proc, url


def start_worker(
    env: dict[str, str], logs_dir: Path, families: str = "sd15,sdxl,flux,qwen-image-edit"
) -> Proc:
    """A CPU worker for ``families``, returned once it consumes; its metrics at ``metrics_url``."""
    port = free_port()
    proc = Proc(
        "worker",
        ["worker", "--families", families, "--device", "cpu"],
        dict(env, WORKER_METRICS_PORT=str(port)),
        logs_dir,
    )
    proc.metrics_url = f"http://127.0.0.1:{port}/metrics"

    def ready() -> bool:
        if proc.proc.poll() is not None:
            raise AssertionError(f"worker exited:\n{proc.tail()}")
        return "ready." in proc.output()

    wait_for(ready, 90, interval=0.2, what="the worker")
    return proc
