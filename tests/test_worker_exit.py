"""A worker that cannot go on exits non-zero, within a bounded time, so its supervisor restarts
it: real worker processes against a private RabbitMQ vhost and the real PostgreSQL."""

from __future__ import annotations

import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from inference_server.devtools.services import private_vhost
from tests.blackhole import minimal_registry, proxy_for, through
from tests.conftest import PG_ADMIN, fresh_database
from tests.support.system import Proc, base_env
from tests.support.waiting import wait_for


@pytest.fixture(scope="module")
def db_url() -> Iterator[str]:
    with fresh_database("is_exit") as url:
        yield url


def start_worker(tmp_path: Path, logs_dir: Path, *, database: str, broker: str, **extra: str) -> Proc:
    env = base_env(
        DATABASE_URL=database,
        BROKER_URL=broker,
        STORAGE_URL=(tmp_path / "storage").as_uri(),
        MODELS_FILE=str(minimal_registry(tmp_path)),
        INFERENCE_SERVER_HOME=str(tmp_path),
        **extra,
    )
    return Proc("worker-exit", ["worker", "--families", "sd15", "--device", "cpu"], env, logs_dir)


def wait_ready(proc: Proc) -> None:
    def ready() -> bool:
        if proc.proc.poll() is not None:
            raise AssertionError(f"worker exited with {proc.proc.returncode}:\n{proc.tail()}")
        return "ready." in proc.log.read_text(errors="replace")

    wait_for(ready, 60, interval=0.2, what="the worker")


def exit_status(proc: Proc, within: float) -> tuple[int, float]:
    start = time.monotonic()
    try:
        status = proc.proc.wait(within)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"worker still running after {within} s:\n{proc.tail()}") from None
    return status, time.monotonic() - start


def test_a_warm_shutdown_still_exits_zero(tmp_path: Path, logs_dir: Path, db_url: str) -> None:
    with private_vhost("is_exit") as broker:
        proc = start_worker(tmp_path, logs_dir, database=db_url, broker=broker)
        wait_ready(proc)
        proc.proc.send_signal(signal.SIGTERM)
        status, _ = exit_status(proc, 30)
        assert status == 0, proc.tail()


def test_an_unrecoverable_broker_error_exits_non_zero(tmp_path: Path, logs_dir: Path, db_url: str) -> None:
    """The family's queue exists as a classic queue (an older deployment's): RabbitMQ refuses the
    worker's quorum declaration with PRECONDITION_FAILED, a channel error Celery does not retry
    ("Unrecoverable error"). The worker used to log it and exit 0."""
    from kombu import Connection, Queue

    from inference_server.publish.topology import JOBS_EXCHANGE, default_queue

    with private_vhost("is_exit") as broker:
        with Connection(broker, connect_timeout=5) as conn:
            name = default_queue("sd15")
            Queue(name, JOBS_EXCHANGE, routing_key=name, durable=True)(conn.default_channel).declare()
        proc = start_worker(tmp_path, logs_dir, database=db_url, broker=broker)
        status, _ = exit_status(proc, 60)
        log = proc.log.read_text(errors="replace")
        assert status == 1, proc.tail()
        assert "Unrecoverable error" in log and "PRECONDITION_FAILED" in log


def test_a_worker_the_broker_keeps_refusing_exits_non_zero(
    tmp_path: Path, logs_dir: Path, db_url: str
) -> None:
    """Its vhost deleted under it, Celery would reconnect several times a second forever."""
    with private_vhost("is_exit") as broker:
        proc = start_worker(tmp_path, logs_dir, database=db_url, broker=broker, BROKER_REFUSED_TIMEOUT="3")
        wait_ready(proc)
        subprocess.run(
            ["rabbitmqctl", "-q", "delete_vhost", broker.rsplit("/", 1)[1]], check=True, timeout=60
        )
        status, took = exit_status(proc, 40)
        assert status == 1, proc.tail()
        assert "refused this worker" in proc.log.read_text(errors="replace")
        assert took >= 3


def test_a_worker_whose_database_is_silent_does_not_start(
    tmp_path: Path, logs_dir: Path, db_url: str
) -> None:
    proxy = proxy_for(db_url)
    proxy.blackhole()
    try:
        with private_vhost("is_exit") as broker:
            proc = start_worker(
                tmp_path,
                logs_dir,
                database=through(db_url, proxy),
                broker=broker,
                DATABASE_CONNECT_TIMEOUT="2",
            )
            # Three tries bounded by the connect timeout, two pauses between them.
            status, took = exit_status(proc, 40)
    finally:
        proxy.close()
    log = proc.log.read_text(errors="replace")
    assert status == 1, proc.tail()
    assert "dependency_unavailable: the database is unavailable" in log
    assert "could not connect to the database within 2 s" in log
    assert "ready." not in log and proxy.accepted >= 3


@contextmanager
def empty_database() -> Iterator[str]:
    name = f"is_empty_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield PG_ADMIN.rsplit("/", 1)[0] + "/" + name
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def test_a_worker_on_an_unmigrated_database_does_not_start(tmp_path: Path, logs_dir: Path) -> None:
    with empty_database() as database, private_vhost("is_exit") as broker:
        proc = start_worker(tmp_path, logs_dir, database=database, broker=broker)
        status, _ = exit_status(proc, 30)
    assert status == 1, proc.tail()
    assert "database_not_migrated" in proc.log.read_text(errors="replace")
