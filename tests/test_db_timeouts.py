"""Bounded waits on the real PostgreSQL: server-side statement and idle-in-transaction limits, TCP
keepalives on the socket, a client that notices a server gone silent (through a blackholing
proxy), a bounded pool checkout, and LISTEN connections that outlive all of it."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from inference_server.db import DatabaseTimeouts, make_database
from inference_server.db.base import listening_connection
from inference_server.devtools.faults.proxy import TcpProxy
from tests.blackhole import proxy_for, through
from tests.conftest import PG_ADMIN


@contextmanager
def engine(url: str = PG_ADMIN, **kw: object) -> Iterator[Engine]:
    db = make_database(url, **kw)  # type: ignore[arg-type]
    try:
        with db.connect() as conn:
            conn.execute(text("SELECT 1"))
    except OperationalError as exc:
        pytest.fail(f"PostgreSQL is required at {PG_ADMIN}: {exc}", pytrace=False)
    try:
        yield db
    finally:
        db.dispose()


@contextmanager
def proxied(**kw: object) -> Iterator[tuple[Engine, TcpProxy]]:
    proxy = proxy_for(PG_ADMIN)
    try:
        with engine(through(PG_ADMIN, proxy), **kw) as db:
            yield db, proxy
    finally:
        proxy.close()


def timed(fn):  # type: ignore[no-untyped-def]
    start = time.monotonic()
    try:
        fn()
    except Exception as exc:
        return exc, time.monotonic() - start
    return None, time.monotonic() - start


def test_sessions_carry_the_server_side_limits() -> None:
    with engine(timeouts=DatabaseTimeouts(statement=1, idle_in_transaction=2)) as db, db.connect() as conn:
        assert conn.execute(text("SHOW statement_timeout")).scalar() == "1s"
        assert conn.execute(text("SHOW idle_in_transaction_session_timeout")).scalar() == "2s"
        exc, took = timed(lambda: conn.execute(text("SELECT pg_sleep(5)")))
        assert isinstance(exc, OperationalError) and "statement timeout" in str(exc)
        assert took < 3


def test_defaults_are_the_settings_defaults() -> None:
    from inference_server.settings import Settings

    fields = Settings.model_fields
    assert DatabaseTimeouts() == DatabaseTimeouts(
        connect=fields["database_connect_timeout"].default,
        statement=fields["database_statement_timeout"].default,
        idle_in_transaction=fields["database_idle_in_transaction_timeout"].default,
        dead_peer=fields["database_dead_peer_timeout"].default,
        pool=fields["database_pool_timeout"].default,
    )
    with engine() as db, db.connect() as conn:
        assert conn.execute(text("SHOW statement_timeout")).scalar() == "30s"
        assert conn.execute(text("SHOW idle_in_transaction_session_timeout")).scalar() == "1min"


def test_a_session_left_idle_in_a_transaction_is_ended_and_replaced() -> None:
    with engine(timeouts=DatabaseTimeouts(idle_in_transaction=1)) as db:
        with db.connect() as conn:
            conn.execute(text("SELECT 1"))  # opens the transaction
            time.sleep(2.5)
            with pytest.raises(OperationalError):
                conn.execute(text("SELECT 1"))
        with db.connect() as conn:
            assert conn.execute(text("SELECT 2")).scalar() == 2


def test_the_socket_detects_a_dead_peer() -> None:
    with engine(timeouts=DatabaseTimeouts(dead_peer=10)) as db, db.connect() as conn:
        fd = conn.connection.dbapi_connection.fileno()  # type: ignore[union-attr]
        sock = socket.socket(fileno=fd)
        try:
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 5
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 2
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 10_000
        finally:
            sock.detach()  # the descriptor stays libpq's


def test_a_server_gone_silent_is_noticed_by_the_client_then_replaced() -> None:
    with proxied(timeouts=DatabaseTimeouts(connect=2, statement=1)) as (db, proxy):
        with db.connect() as conn:
            conn.execute(text("SELECT 1"))
            proxy.blackhole()
            exc, took = timed(lambda: conn.execute(text("SELECT 1")))
        assert isinstance(exc, OperationalError), exc
        assert "could not get an answer from the database within 2 s" in str(exc)
        assert 1.5 < took < 4
        # A new connection meets the silence at its start.
        exc, took = timed(lambda: db.connect().close())
        assert isinstance(exc, OperationalError), exc
        assert "could not connect to the database within 2 s" in str(exc)
        assert 1.5 < took < 4
        proxy.heal()
        with db.connect() as conn:
            assert conn.execute(text("SELECT 3")).scalar() == 3


def test_a_long_statement_under_the_limit_is_not_cut() -> None:
    """The client waits the statement timeout plus a grace: only a server that would have
    canceled the statement itself is given up on."""
    with proxied(timeouts=DatabaseTimeouts(statement=3)) as (db, _), db.connect() as conn:
        exc, took = timed(lambda: conn.execute(text("SELECT pg_sleep(2)")))
        assert exc is None and took >= 2


def test_an_exhausted_pool_refuses_a_checkout_in_time() -> None:
    with engine(pool_size=1, timeouts=DatabaseTimeouts(pool=1)) as db:
        held = [db.connect(), db.connect()]  # the pool and its overflow
        try:
            exc, took = timed(lambda: db.connect())
        finally:
            for conn in held:
                conn.close()
        assert isinstance(exc, PoolTimeout) and 0.9 < took < 3


def test_a_listening_connection_outlives_the_limits() -> None:
    with engine(timeouts=DatabaseTimeouts(statement=1, idle_in_transaction=1)) as db:
        raw = listening_connection(db, "bounded_waits_test")
        try:
            time.sleep(2.5)
            with db.connect() as conn:
                conn.execute(text("NOTIFY bounded_waits_test, 'hello'"))
                conn.commit()
            listener = raw.driver_connection
            deadline = time.monotonic() + 5
            while not listener.notifies and time.monotonic() < deadline:
                listener.poll()
                time.sleep(0.05)
            assert [n.payload for n in listener.notifies] == ["hello"]
        finally:
            raw.invalidate()


def test_parameters_in_the_url_win() -> None:
    url = f"{PG_ADMIN}?connect_timeout=7&options=-c%20application_name%3Dbounded"
    with engine(url) as db, db.connect() as conn:
        params = conn.connection.dbapi_connection.get_dsn_parameters()  # type: ignore[union-attr]
        assert params["connect_timeout"] == "7"
        assert conn.execute(text("SHOW application_name")).scalar() == "bounded"
        assert conn.execute(text("SHOW statement_timeout")).scalar() == "30s"


def test_sqlite_is_unchanged(tmp_path) -> None:  # type: ignore[no-untyped-def]
    db = make_database(f"sqlite:///{tmp_path / 'x.db'}", timeouts=DatabaseTimeouts(statement=1))
    with db.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
    db.dispose()


def test_settings_reach_the_timeouts() -> None:
    from inference_server.settings import Settings

    settings = Settings(
        database_connect_timeout=3,
        database_statement_timeout=12,
        database_idle_in_transaction_timeout=40,
        database_dead_peer_timeout=6,
        database_pool_timeout=2,
    )
    assert DatabaseTimeouts.from_settings(settings) == DatabaseTimeouts(3, 12, 40, 6, 2)
    assert DatabaseTimeouts.from_settings(settings, statement=0).statement == 0  # migrations
    params = DatabaseTimeouts(dead_peer=6).libpq_params()
    assert (params["keepalives_idle"], params["keepalives_interval"], params["keepalives_count"]) == (3, 1, 3)
    assert params["tcp_user_timeout"] == 6000
    assert "keepalives" not in DatabaseTimeouts(dead_peer=0).libpq_params()
