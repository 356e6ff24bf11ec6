"""Helpers for the webhook tests: a scratch PostgreSQL database at head, real HTTP receivers on
loopback, and seeded jobs with events."""

from __future__ import annotations

import http.server
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from inference_server.db import Job, JobEvent, Tenant, make_database, make_session_factory
from inference_server.db.base import utcnow
from inference_server.settings import Settings
from webhooks.secrets import new_secret

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def migrate(url: str) -> None:
    from inference_server.migrate import upgrade

    upgrade(url)


@pytest.fixture(scope="module")
def db_url() -> Iterator[str]:
    """A scratch database per test module: these tests empty every table between tests."""
    from tests.conftest import fresh_database

    with fresh_database("webhooks") as url:
        yield url


@pytest.fixture
def sf(db_url: str) -> Iterator[Callable[[], Session]]:
    engine = make_database(db_url)
    factory = make_session_factory(engine)
    truncate_all(factory)
    yield factory
    engine.dispose()


def truncate_all(session_factory: Callable[[], Session]) -> None:
    with session_factory() as s, s.begin():
        s.execute(
            text(
                "TRUNCATE webhook_attempts, webhook_deliveries, webhook_gone_urls, job_events, "
                "outbox, job_outputs, jobs, api_keys, tenants CASCADE"
            )
        )


def make_settings(url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": url,
        "allow_private_networks": True,
        "webhook_retry_delays": [0.05, 0.05, 0.05],
        "webhook_timeout": 5.0,
        "webhook_concurrency": 8,
        "webhook_poll_interval": 0.02,
    }
    values.update(overrides)
    return Settings(**values)


# -- receivers ------------------------------------------------------------------------------------


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    path: str
    at: float


Behaviour = Callable[[int, "Received"], tuple[int, dict[str, str], float]]


def accept(n: int, req: Received) -> tuple[int, dict[str, str], float]:
    return 204, {}, 0.0


@dataclass
class Receiver:
    """A real HTTP server on loopback. ``behaviour(n, request)`` returns (status, headers, delay)."""

    behaviour: Behaviour = accept
    requests: list[Received] = field(default_factory=list)

    def __post_init__(self) -> None:
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                req = Received(
                    {k.lower(): v for k, v in self.headers.items()}, body, self.path, time.monotonic()
                )
                with receiver._lock:
                    n = len(receiver.requests)
                    receiver.requests.append(req)
                status, headers, delay = receiver.behaviour(n, req)
                if delay:
                    time.sleep(delay)
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_POST  # noqa: N815

            def log_message(self, *args: Any) -> None:
                pass

        self._lock = threading.Lock()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def ids(self) -> list[str]:
        return [r.headers["webhook-id"] for r in self.requests]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


# -- seeding ----------------------------------------------------------------------------------------


def add_tenant(session: Session, name: str | None = None, **fields: Any) -> Tenant:
    tenant = Tenant(name=name or f"t-{uuid.uuid4().hex[:8]}", webhook_secret=new_secret(), **fields)
    session.add(tenant)
    session.flush()
    return tenant


def add_job(session: Session, tenant: Tenant, url: str | None, events: list[str] | None = None) -> Job:
    job = Job(
        tenant_id=tenant.id,
        family="sd15",
        task="txt2img",
        params={"prompt": "x"},
        webhook_url=url,
        webhook_events=events,
    )
    session.add(job)
    session.flush()
    return job


def add_event(session: Session, job: Job, type_: str, **data: Any) -> JobEvent:
    now = utcnow()
    event = JobEvent(
        id=f"msg_{uuid.uuid4().hex}",
        job_id=job.id,
        tenant_id=job.tenant_id,
        type=type_,
        payload={"type": type_, "timestamp": now.isoformat(), "data": {"id": job.id, **data}},
        created_at=now,
    )
    session.add(event)
    session.flush()
    return event
