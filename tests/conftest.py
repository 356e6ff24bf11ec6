"""Shared fixtures: a fresh PostgreSQL database, the real RabbitMQ, a moto S3 server process, tiny
models, a running API and worker, and real HTTP webhook receivers. Nothing here is mocked; a missing
service fails the run loudly."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests

from inference_server.devtools import services

os.environ.setdefault("OMP_NUM_THREADS", "1")

# Fixtures of the webhook tests' scratch databases (`db_url`, `sf`).
pytest_plugins = ["tests.webhook_support"]

PG_ADMIN = os.environ.get("TEST_PG_ADMIN_URL", services.DEFAULT_PG_ADMIN)
BROKER = os.environ.get("TEST_BROKER_URL", services.DEFAULT_BROKER)
ROOT = Path(__file__).resolve().parent.parent
free_port = services.free_port


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.05, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


# -- services -------------------------------------------------------------------------------------


@contextmanager
def fresh_database(prefix: str = "is_test") -> Iterator[str]:
    """A new PostgreSQL database at migration head, dropped afterwards."""
    try:
        with services.fresh_database(prefix, PG_ADMIN) as url:
            yield url
    except services.ServiceUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    with fresh_database() as url:
        yield url


@contextmanager
def private_vhost(prefix: str = "is_test") -> Iterator[str]:
    """A RabbitMQ vhost of this run's own on the shared broker, deleted afterwards with everything
    in it: the suite never declares, deletes or leaves a queue on the broker's default vhost."""
    try:
        with services.private_vhost(prefix, BROKER) as url:
            yield url
    except services.ServiceUnavailable as exc:
        pytest.fail(f"rabbitmqctl is required to give the tests a vhost of their own: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def broker_url() -> Iterator[str]:
    from kombu import Connection

    with private_vhost() as url:
        try:
            with Connection(url, connect_timeout=5) as conn:
                conn.ensure_connection(max_retries=1)
        except Exception as exc:
            pytest.fail(f"RabbitMQ is required at {url}: {exc}", pytrace=False)
        yield url


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto in server mode, a separate process spoken to over HTTP."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    endpoint = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return requests.get(endpoint, timeout=1).status_code < 500
        except requests.RequestException:
            return False

    wait_for(up, 30, what="moto server")
    yield endpoint
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every family's tiny random-weight model and its registry file, built once per run."""
    cached = os.environ.get("TEST_TINY_MODELS")
    if cached and Path(cached, "models.toml").exists():
        return Path(cached, "models.toml")
    import torch

    torch.set_num_threads(1)
    from inference_server.engine.tiny import build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("tiny"))


# -- the system -----------------------------------------------------------------------------------


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "BROKER_", "STORAGE_"))}
    env.update(OMP_NUM_THREADS="1", TORCH_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def system_env(
    pg_url: str,
    broker_url: str,
    s3_endpoint: str,
    tiny_models: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, str]:
    """The environment every process of the system under test shares."""
    import boto3

    bucket = f"is-test-{uuid.uuid4().hex[:8]}"
    env = base_env(
        DATABASE_URL=pg_url,
        BROKER_URL=broker_url,
        STORAGE_URL=f"s3://{bucket}/outputs",
        S3_ENDPOINT_URL=s3_endpoint,
        AWS_ACCESS_KEY_ID="test",
        AWS_SECRET_ACCESS_KEY="test",
        AWS_DEFAULT_REGION="us-east-1",
        MODELS_FILE=str(tiny_models),
        MODEL_CACHE_DIR=str(tmp_path_factory.mktemp("model-cache")),
        INFERENCE_SERVER_HOME=str(tmp_path_factory.mktemp("home")),
        ALLOW_PRIVATE_NETWORKS="true",
        PROGRESS_INTERVAL="0.2",
        CANCEL_POLL_INTERVAL="0.1",
        RELAY_INTERVAL="0.05",
        WEBHOOK_POLL_INTERVAL="0.05",
        WEBHOOK_RETRY_DELAYS="0.5,0.5,0.5",
        ENGINE_MAX_EDIT_PIXELS="4096",
        DISPATCHER_METRICS_PORT="0",
    )
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        os.environ.setdefault(key, env[key])
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    return env


@pytest.fixture(scope="session")
def settings(system_env: dict[str, str]):  # type: ignore[no-untyped-def]
    from inference_server.settings import Settings

    saved = dict(os.environ)
    os.environ.update(system_env)
    try:
        return Settings()
    finally:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="session")
def session_factory(settings):  # type: ignore[no-untyped-def]
    from inference_server.db import make_database, make_session_factory

    engine = make_database(settings.database_url)
    yield make_session_factory(engine)
    engine.dispose()


class Proc:
    """A child process of the system with its log kept for failure messages."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log = log_dir / f"{name}-{uuid.uuid4().hex[:6]}.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "inference_server.cli.main", *args],
            env=env,
            cwd=ROOT,
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def kill(self, sig: int = 9) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait(10)


@pytest.fixture(scope="session")
def logs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def api_server(system_env: dict[str, str], logs_dir: Path) -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = Proc("api", ["api", "--port", str(port)], dict(system_env, API_URL=url), logs_dir)

    def ready() -> bool:
        if proc.proc.poll() is not None:
            raise AssertionError(f"API exited:\n{proc.tail()}")
        try:
            return requests.get(f"{url}/healthz", timeout=1).ok
        except requests.RequestException:
            return False

    wait_for(ready, 60, what="the API")
    yield url
    proc.kill(15)


def start_worker(
    env: dict[str, str], logs_dir: Path, families: str = "sd15,sdxl,flux,qwen-image-edit"
) -> Proc:
    port = free_port()
    env = dict(env, WORKER_METRICS_PORT=str(port))
    proc = Proc("worker", ["worker", "--families", families, "--device", "cpu"], env, logs_dir)
    proc.metrics_url = f"http://127.0.0.1:{port}/metrics"  # type: ignore[attr-defined]

    def ready() -> bool:
        if proc.proc.poll() is not None:
            raise AssertionError(f"worker exited:\n{proc.tail()}")
        return "ready." in proc.log.read_text(errors="replace")

    wait_for(ready, 90, interval=0.2, what="the worker")
    return proc


@pytest.fixture(scope="session")
def worker(system_env: dict[str, str], logs_dir: Path, api_server: str) -> Iterator[Proc]:
    proc = start_worker(dict(system_env, API_URL=api_server), logs_dir)
    yield proc
    proc.kill(15)


@pytest.fixture(scope="session")
def dispatcher(system_env: dict[str, str], logs_dir: Path, api_server: str) -> Iterator[Proc]:
    proc = Proc("dispatcher", ["dispatcher"], dict(system_env, API_URL=api_server), logs_dir)
    time.sleep(1.0)
    if proc.proc.poll() is not None:
        raise AssertionError(f"dispatcher exited:\n{proc.tail()}")
    yield proc
    proc.kill(15)


class TenantKey:
    def __init__(self, tenant: Any, api_key: str) -> None:
        self.tenant = tenant
        self.api_key = api_key
        self.webhook_secret = tenant.webhook_secret


@pytest.fixture
def tenant(session_factory) -> TenantKey:  # type: ignore[no-untyped-def]
    from api.auth import create_tenant_key

    with session_factory() as session:
        row, key = create_tenant_key(session, f"tenant-{uuid.uuid4().hex[:8]}")
    return TenantKey(row, key)


@pytest.fixture
def api_client(api_server: str, tenant: TenantKey) -> Iterator[requests.Session]:
    http = requests.Session()
    http.headers["Authorization"] = f"Bearer {tenant.api_key}"
    http.base_url = api_server  # type: ignore[attr-defined]
    yield http
    http.close()


# -- webhook receivers ------------------------------------------------------------------------------


class Receiver:
    """A real HTTP server on loopback that records every request and answers per ``behaviour``."""

    def __init__(self) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.requests: list[dict[str, Any]] = []
        self.behaviour = lambda n, req: (200, {}, b"ok")  # (status, headers, body) for the n-th request
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                req = {
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                    "body": body,
                    "path": self.path,
                    "at": time.time(),
                }
                with receiver._lock:
                    receiver.requests.append(req)
                    n = len(receiver.requests)
                status, headers, payload = receiver.behaviour(n, req)
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def events(self, job_id: str | None = None) -> list[dict[str, Any]]:
        import json

        with self._lock:
            out = []
            for req in self.requests:
                body = json.loads(req["body"])
                if job_id is None or body["data"]["id"] == job_id:
                    out.append({**req, "type": body["type"], "json": body})
            return out

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()
