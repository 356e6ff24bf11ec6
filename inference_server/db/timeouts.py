"""Bounded waits on PostgreSQL: no connection, statement or checkout waits on a database forever.

Four layers, because each covers a failure the others cannot see:

* the server cancels a statement past ``statement_timeout`` and ends a session left idle inside a
  transaction past ``idle_in_transaction_session_timeout`` (its locks go with it);
* TCP keepalives and ``tcp_user_timeout`` make the kernel drop a connection whose peer stopped
  acknowledging (a partition, a dead host), even during a long statement;
* with psycopg2, every wait for the server goes through ``wait_for_server``, which gives up when no
  byte comes back in time: a server that took the bytes but never answers (a stuck proxy, a frozen
  backend) is noticed by the client too. A healthy server always answers within its statement
  timeout, since it cancels the statement itself then, so the client's limit is that plus a grace;
* the pool refuses a checkout after ``pool_timeout`` instead of queueing requests without end.

Connections that LISTEN sit outside any transaction in autocommit, so none of these end them.
"""

from __future__ import annotations

import math
import select
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from inference_server.settings import Settings

# The server answers a canceled statement at once; this covers the round trip and a slow commit.
ANSWER_GRACE = 1.0
_EVENTS = {1: select.POLLIN, 2: select.POLLOUT}  # psycopg2's POLL_READ, POLL_WRITE


@dataclass(frozen=True)
class DatabaseTimeouts:
    """How long a PostgreSQL connection may wait, in seconds; 0 turns a limit off. The defaults are
    the settings' defaults (DATABASE_CONNECT_TIMEOUT and the rest)."""

    connect: float = 5.0
    statement: float = 30.0
    idle_in_transaction: float = 60.0
    dead_peer: float = 10.0
    pool: float = 5.0

    @classmethod
    def from_settings(
        cls, settings: Settings, *, statement: float | None = None, connect: float | None = None
    ) -> DatabaseTimeouts:
        """The settings' timeouts; ``statement`` overrides the statement timeout (the API's, 0 for
        migrations, whose DDL may rightly run long), ``connect`` the connect timeout."""
        return cls(
            connect=settings.database_connect_timeout if connect is None else connect,
            statement=settings.database_statement_timeout if statement is None else statement,
            idle_in_transaction=settings.database_idle_in_transaction_timeout,
            dead_peer=settings.database_dead_peer_timeout,
            pool=settings.database_pool_timeout,
        )

    @property
    def answer(self) -> float:
        """Longest a healthy server stays silent during a statement (0: no limit)."""
        return self.statement + ANSWER_GRACE if self.statement > 0 else 0.0

    def libpq_params(self) -> dict[str, Any]:
        """Connection parameters for libpq, which psycopg2 passes through."""
        params: dict[str, Any] = {}
        if self.connect > 0:
            params["connect_timeout"] = max(2, math.ceil(self.connect))  # libpq's floor is 2 s
        if self.dead_peer > 0:
            # Probes start after half the budget and three unanswered ones end it; tcp_user_timeout
            # covers data sent and never acknowledged, which keepalives do not.
            idle = max(1, math.ceil(self.dead_peer / 2))
            params.update(
                keepalives=1,
                keepalives_idle=idle,
                keepalives_interval=max(1, math.ceil((self.dead_peer - idle) / 3)),
                keepalives_count=3,
                tcp_user_timeout=int(self.dead_peer * 1000),
            )
        return params

    def server_options(self) -> list[str]:
        """``-c`` options for the server session, at connection start (no extra round trip)."""
        options = []
        if self.statement > 0:
            options.append(f"-c statement_timeout={int(self.statement * 1000)}")
        if self.idle_in_transaction > 0:
            options.append(f"-c idle_in_transaction_session_timeout={int(self.idle_in_transaction * 1000)}")
        return options


def connection_class(timeouts: DatabaseTimeouts) -> type:
    """A psycopg2 connection class that carries its limits to ``wait_for_server``."""
    import psycopg2.extensions

    return type(
        "BoundedConnection",
        (psycopg2.extensions.connection,),
        {"connect_limit": timeouts.connect, "answer_limit": timeouts.answer},
    )


def wait_for_server(conn: Any) -> None:
    """psycopg2's wait callback: drive ``conn`` until its operation completes, giving up when the
    server sends nothing for the connection's limit. psycopg2 closes the connection when this
    raises, so the pool discards it."""
    import psycopg2
    import psycopg2.extensions as ext

    connecting = conn.status == ext.STATUS_SETUP
    limit = getattr(conn, "connect_limit" if connecting else "answer_limit", 0.0)
    if connecting and not hasattr(conn, "connect_limit"):
        # A connection this module did not make: honour its own connect_timeout, which libpq
        # itself ignores once a wait callback is installed.
        limit = float(ext.parse_dsn(conn.dsn).get("connect_timeout") or 0)
    poller = select.poll()
    while True:
        state = conn.poll()
        if state == ext.POLL_OK:
            return
        events = _EVENTS.get(state)
        if events is None:
            raise psycopg2.OperationalError(f"unexpected state {state} polling the connection")
        poller.register(conn.fileno(), events)
        # The limit is on silence, not on the whole operation: a large result still streaming in
        # is a live server.
        if not poller.poll(limit * 1000 if limit > 0 else None):
            what = "connect to" if connecting else "get an answer from"
            raise psycopg2.OperationalError(f"could not {what} the database within {limit:g} s")


def install_wait_callback() -> None:
    """Route psycopg2's waits through ``wait_for_server`` (process-wide; idempotent). A callback
    someone else installed (gevent's, say) is left alone: it has its own idea of waiting."""
    import psycopg2.extensions as ext

    current = ext.get_wait_callback()
    if current is None:
        ext.set_wait_callback(wait_for_server)
