"""The fixtures of the suite. Nothing here is mocked; a missing service fails the run loudly.

Databases, one family:
- ``system_db_url`` / ``system_db``: the database of the running system (API, worker, dispatcher);
  a job written there may be taken by the running relay and worker.
- ``scratch_db_url``: a database of the test module's own at migration head, which no process of the
  running system sees; ``scratch_db``: sessions on it, every table emptied before each test.

Services and the system: ``broker_url`` (a RabbitMQ vhost of this run's own; ``default_vhost_untouched``
fails the run if the queues on the default vhost changed), ``s3_endpoint`` (a moto
server process), ``tiny_models``, ``system_env``/``settings``, ``api_server``, ``worker``,
``dispatcher``, ``tenant``, ``api_client``. Webhook receivers: ``receiver`` and ``make_receiver``.
Helpers the tests import are in ``tests/support``."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy.orm import Session, sessionmaker

from inference_server.devtools import services
from tests.support.receiver import Behaviour, Receiver, accept
from tests.support.seed import truncate_all
from tests.support.system import Proc, base_env, start_api, start_worker
from tests.support.waiting import wait_for

os.environ.setdefault("OMP_NUM_THREADS", "1")

PG_ADMIN = os.environ.get("TEST_PG_ADMIN_URL", services.DEFAULT_PG_ADMIN)
BROKER = os.environ.get("TEST_BROKER_URL", services.DEFAULT_BROKER)


@contextmanager
def fresh_database(prefix: str) -> Iterator[str]:
    """A new PostgreSQL database at migration head, dropped afterwards."""
    try:
        with services.fresh_database(prefix, PG_ADMIN) as url:
            yield url
    except services.ServiceUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)


@contextmanager
def _sessions(url: str) -> Iterator[sessionmaker[Session]]:
    from inference_server.db import make_database, make_session_factory

    engine = make_database(url)
    try:
        yield make_session_factory(engine)
    finally:
        engine.dispose()


# -- databases --------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def system_db_url() -> Iterator[str]:
    """The URL of the running system's database, made for this run."""
    with fresh_database("is_test") as url:
        yield url


@pytest.fixture(scope="session")
def system_db(system_db_url: str) -> Iterator[sessionmaker[Session]]:
    """Sessions on the running system's database."""
    with _sessions(system_db_url) as factory:
        yield factory


@pytest.fixture(scope="module")
def scratch_db_url() -> Iterator[str]:
    """The URL of a database of this test module's own, at migration head: the running system's
    relay and worker never see what is written there."""
    with fresh_database("is_scratch") as url:
        yield url


@pytest.fixture
def scratch_db(scratch_db_url: str) -> Iterator[sessionmaker[Session]]:
    """Sessions on ``scratch_db_url``, every table emptied before the test."""
    with _sessions(scratch_db_url) as factory:
        truncate_all(factory)
        yield factory


# -- services ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session", autouse=True)
def default_vhost_untouched() -> Iterator[None]:
    """Fails the run if the queues on the broker's default vhost "/" differ at its end from its
    start: the suite works on a vhost of its own (``broker_url``), and other programs share "/"."""
    try:
        before = services.vhost_queues("/")
    except services.ServiceUnavailable as exc:
        pytest.fail(f"rabbitmqctl is required to watch the default vhost: {exc}", pytrace=False)
    yield
    after = services.vhost_queues("/")
    if after != before:
        added, removed = sorted(set(after) - set(before)), sorted(set(before) - set(after))
        pytest.fail(
            f'the run changed the queues on the default vhost "/": added {added}, removed {removed}',
            pytrace=False,
        )


@pytest.fixture(scope="session")
def broker_url() -> Iterator[str]:
    """The URL of a RabbitMQ vhost of this run's own on the shared broker, deleted afterwards with
    everything in it: the suite never declares, deletes or leaves a queue on the default vhost."""
    from kombu import Connection

    try:
        with services.private_vhost("is_test", BROKER) as url:
            try:
                with Connection(url, connect_timeout=5) as conn:
                    conn.ensure_connection(max_retries=1)
            except Exception as exc:
                pytest.fail(f"RabbitMQ is required at {url}: {exc}", pytrace=False)
            yield url
    except services.ServiceUnavailable as exc:
        pytest.fail(f"rabbitmqctl is required to give the tests a vhost of their own: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto in server mode, a separate process spoken to over HTTP."""
    port = services.free_port()
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


# -- the system -------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def system_env(
    system_db_url: str,
    broker_url: str,
    s3_endpoint: str,
    tiny_models: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, str]:
    """The environment every process of the system under test shares."""
    import boto3

    bucket = f"is-test-{uuid.uuid4().hex[:8]}"
    env = base_env(
        DATABASE_URL=system_db_url,
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
        JOB_LEASE_SECONDS="4",
        RECONCILE_INTERVAL="0.5",
        JOB_RETRY_DELAYS="0.5,1,2",
        LOST_MESSAGE_GRACE="10",
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
    """The running system's settings, as its processes read them from ``system_env``."""
    from inference_server.settings import Settings

    saved = dict(os.environ)
    os.environ.update(system_env)
    try:
        return Settings()
    finally:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="session")
def logs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def api_server(system_env: dict[str, str], logs_dir: Path) -> Iterator[str]:
    """The base URL of a running `inference-server api`."""
    proc, url = start_api(system_env, logs_dir)
    yield url
    proc.kill(15)


@pytest.fixture(scope="session")
def worker(system_env: dict[str, str], logs_dir: Path, api_server: str) -> Iterator[Proc]:
    """A running CPU worker for every family."""
    proc = start_worker(dict(system_env, API_URL=api_server), logs_dir)
    yield proc
    proc.kill(15)


@pytest.fixture(scope="session")
def dispatcher(system_env: dict[str, str], logs_dir: Path, api_server: str) -> Iterator[Proc]:
    """A running `inference-server dispatcher`."""
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
def tenant(system_db: sessionmaker[Session]) -> TenantKey:
    """A new tenant of the running system and its API key."""
    from api.auth import create_tenant_key

    with system_db() as session:
        row, key = create_tenant_key(session, f"tenant-{uuid.uuid4().hex[:8]}")
    return TenantKey(row, key)


@pytest.fixture
def api_client(api_server: str, tenant: TenantKey) -> Iterator[requests.Session]:
    """An HTTP session on the running API with ``tenant``'s key; ``base_url`` is the API's."""
    http = requests.Session()
    http.headers["Authorization"] = f"Bearer {tenant.api_key}"
    http.base_url = api_server  # type: ignore[attr-defined]
    yield http
    http.close()


# -- webhook receivers --------------------------------------------------------------------------------


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A webhook receiver that answers 204 to everything (its ``behaviour`` may be replaced)."""
    with Receiver() as r:
        yield r


@pytest.fixture
def make_receiver() -> Iterator[Callable[..., Receiver]]:
    """``make_receiver(behaviour)`` starts another receiver; all are closed after the test."""
    made: list[Receiver] = []

    def make(behaviour: Behaviour = accept) -> Receiver:
        made.append(Receiver(behaviour))
        return made[-1]

    yield make
    for r in made:
        r.close()
