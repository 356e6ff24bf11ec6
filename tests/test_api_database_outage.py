"""The real API process, its database behind a proxy that goes silent: submits and /readyz answer
503 with a code within seconds instead of hanging, and work again once the database answers."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from inference_server.devtools.faults.proxy import TcpProxy
from inference_server.devtools.services import free_port
from tests.blackhole import minimal_registry, proxy_for, through
from tests.conftest import fresh_database
from tests.support.system import Proc, base_env
from tests.support.waiting import wait_for

SUBMIT = {"family": "sd15", "prompt": "a lighthouse", "width": 64, "height": 64, "steps": 4}
BOUND = 8.0  # seconds: the API's statement timeout plus its grace, or its connect timeout, and slack


@pytest.fixture(scope="module")
def outage(broker_url: str, tmp_path_factory: pytest.TempPathFactory, logs_dir: Path) -> Iterator[Any]:
    from api.auth import create_tenant_key
    from inference_server.db import make_database, make_session_factory

    home = tmp_path_factory.mktemp("outage")
    with fresh_database("is_outage") as db_url:
        engine = make_database(db_url)
        with make_session_factory(engine)() as session:
            _, key = create_tenant_key(session, f"outage-{uuid.uuid4().hex[:6]}")
        engine.dispose()
        proxy = proxy_for(db_url)
        port = free_port()
        env = base_env(
            DATABASE_URL=through(db_url, proxy),
            BROKER_URL=broker_url,
            STORAGE_URL=(home / "storage").as_uri(),
            MODELS_FILE=str(minimal_registry(home)),
            INFERENCE_SERVER_HOME=str(home),
        )
        api = Proc("api-outage", ["api", "--port", str(port)], env, logs_dir)
        base = f"http://127.0.0.1:{port}"
        http = requests.Session()
        http.headers["Authorization"] = f"Bearer {key}"

        def up() -> bool:
            if api.proc.poll() is not None:
                raise AssertionError(f"API exited:\n{api.tail()}")
            try:
                return http.get(f"{base}/readyz", timeout=2).ok
            except requests.RequestException:
                return False

        try:
            wait_for(up, 60, what="the API")
            yield base, http, proxy, api
        finally:
            api.kill(15)
            proxy.close()


def timed(fn) -> tuple[requests.Response, float]:  # type: ignore[no-untyped-def]
    start = time.monotonic()
    response = fn()
    return response, time.monotonic() - start


def assert_unavailable(response: requests.Response, took: float, api: Proc) -> None:
    assert response.status_code == 503, (response.status_code, response.text, api.tail())
    error = response.json()["error"]
    assert error["code"] == "dependency_unavailable" and error["message"], error
    assert took < BOUND, f"answered after {took:.1f} s"


def test_a_silent_database_gets_a_fast_503_then_the_api_recovers(outage) -> None:  # type: ignore[no-untyped-def]
    base, http, proxy, api = outage
    submit = lambda: http.post(f"{base}/v1/jobs", json=SUBMIT, timeout=30)  # noqa: E731
    ready = lambda: http.get(f"{base}/readyz", timeout=30)  # noqa: E731
    assert submit().status_code == 202
    # Concurrent requests leave the pool several open connections for the outage to silence.
    with ThreadPoolExecutor(8) as pool:
        assert all(r.ok for r in pool.map(lambda _: ready(), range(16)))

    proxy.blackhole()
    try:
        # The first round meets pooled connections that go silent, the second new connections
        # that never get past their start.
        for _ in range(2):
            response, took = timed(submit)
            assert_unavailable(response, took, api)
            response, took = timed(ready)
            assert_unavailable(response, took, api)
            assert response.json()["checks"] == {"database": False, "broker": True}
    finally:
        proxy.heal()

    wait_for(lambda: ready().ok, 15, what="/readyz after the database came back")
    response = submit()
    assert response.status_code == 202, response.text
    job = http.get(f"{base}/v1/jobs/{response.json()['id']}", timeout=10).json()
    assert job["status"] == "queued"
    assert api.proc.poll() is None


def test_blackhole_proxy_really_holds_connections() -> None:
    """The harness itself: while blackholed, connections are accepted and bytes swallowed."""
    import socket

    target = socket.create_server(("127.0.0.1", 0))
    proxy = TcpProxy(target.getsockname())
    try:
        proxy.blackhole()
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=2) as conn:
            conn.sendall(b"hello")
            conn.settimeout(0.5)
            with pytest.raises(TimeoutError):
                conn.recv(10)
        target.settimeout(0.3)
        with pytest.raises(TimeoutError):
            target.accept()  # nothing reached the server
    finally:
        proxy.close()
        target.close()
