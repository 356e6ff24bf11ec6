"""Scratch resources on the machine's real services, made and removed by the caller.

A scratch database is created from PostgreSQL's admin URL and migrated to head; a private vhost is
added with ``rabbitmqctl`` (the broker must be local), so that nothing a test or a benchmark does
touches the broker's default vhost ``/``, which other programs share."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import quote, urlsplit

from sqlalchemy import create_engine, text

DEFAULT_PG_ADMIN = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
DEFAULT_BROKER = "amqp://guest:guest@127.0.0.1:5672//"


class ServiceUnavailable(RuntimeError):
    """A service the tests or benchmarks need is not there or refused the request."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scratch_name(prefix: str) -> str:
    return f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:6]}"


@contextmanager
def fresh_database(prefix: str, admin_url: str = DEFAULT_PG_ADMIN) -> Iterator[str]:
    """Yield the URL of a new PostgreSQL database at migration head; drop it afterwards, with
    whatever connections are still open to it."""
    name = _scratch_name(prefix)
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:
        admin.dispose()
        raise ServiceUnavailable(f"PostgreSQL is required at {admin_url}: {exc}") from exc
    url = admin_url.rsplit("/", 1)[0] + "/" + name
    try:
        from inference_server.migrate import upgrade

        upgrade(url)
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(
                text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :name"),
                {"name": name},
            )
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


def rabbitmqctl(*args: str) -> str:
    """Run ``rabbitmqctl -q ARGS`` on the local broker; return its output."""
    try:
        done = subprocess.run(
            ["rabbitmqctl", "-q", *args], check=True, capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise ServiceUnavailable(f"rabbitmqctl {' '.join(args)} failed: {exc}") from exc
    return done.stdout


@contextmanager
def private_vhost(prefix: str, broker_url: str = DEFAULT_BROKER) -> Iterator[str]:
    """Yield ``broker_url`` pointed at a new vhost of the caller's own on the same broker; delete
    the vhost afterwards, with every queue and exchange in it."""
    name = _scratch_name(prefix)
    parts = urlsplit(broker_url)
    rabbitmqctl("add_vhost", name)
    try:
        rabbitmqctl("set_permissions", "-p", name, parts.username or "guest", ".*", ".*", ".*")
        yield parts._replace(path="/" + quote(name, safe="")).geturl()
    finally:
        with contextlib.suppress(ServiceUnavailable):
            rabbitmqctl("delete_vhost", name)


def vhost_queues(vhost: str = "/") -> list[str]:
    """The names of the queues on ``vhost`` (by default the broker's default vhost), sorted."""
    return sorted(rabbitmqctl("list_queues", "-p", vhost, "--no-table-headers", "name").split())
