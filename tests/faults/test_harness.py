"""The fault harness itself: the proxy cuts, blackholes, resets and heals; the private PostgreSQL
and RabbitMQ instances stop and die without touching the shared servers; the receiver refuses a bad
signature and goes down for real; the tally counts what it says."""

from __future__ import annotations

import contextlib
import datetime
import socket
import subprocess
import threading
import time
from collections import Counter

import pytest
import requests
import standardwebhooks

from inference_server.devtools.faults.postgres import PrivatePostgres
from inference_server.devtools.faults.proxy import TcpProxy
from inference_server.devtools.faults.receiver import VerifyingReceiver
from inference_server.devtools.faults.tally import Tally, count_jobs, count_webhooks, format_table

pytestmark = pytest.mark.faults


@pytest.fixture
def echo():
    """A TCP server on loopback that sends back what it gets."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):  # the proxy resets some connections on purpose
            while data := conn.recv(4096):
                conn.sendall(data)

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield server.getsockname()
    server.close()


def _talk(sock: socket.socket, data: bytes, timeout: float = 2.0) -> bytes:
    sock.settimeout(timeout)
    sock.sendall(data)
    return sock.recv(4096)


def test_proxy_passes_blackholes_cuts_resets_and_heals(echo):
    proxy = TcpProxy(echo)
    try:
        live = socket.create_connection(proxy.address, timeout=2)
        assert _talk(live, b"one") == b"one"

        proxy.blackhole()  # held, not lost: the reply arrives after the heal
        live.sendall(b"two")
        live.settimeout(0.5)
        with pytest.raises(TimeoutError):
            live.recv(4096)
        late = socket.create_connection(proxy.address, timeout=2)  # accepted, then silence
        proxy.heal()
        live.settimeout(2)
        assert live.recv(4096) == b"two"
        assert _talk(late, b"three") == b"three"

        proxy.cut()
        live.settimeout(2)
        assert live.recv(4096) == b""  # closed under it
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(proxy.address, timeout=2)
        proxy.heal()
        again = socket.create_connection(proxy.address, timeout=2)
        assert _talk(again, b"four") == b"four"

        proxy.reset()
        time.sleep(0.2)  # a link notices within a tick
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            _talk(again, b"five")
        with pytest.raises((ConnectionResetError, BrokenPipeError)):  # at connect or at the first use
            _talk(socket.create_connection(proxy.address, timeout=2), b"six")
        proxy.heal()
        assert _talk(socket.create_connection(proxy.address, timeout=2), b"seven") == b"seven"
    finally:
        proxy.close()


def test_a_slow_proxy_adds_its_round_trip_to_every_exchange_and_keeps_the_bytes(echo):
    proxy = TcpProxy(echo)
    try:
        sock = socket.create_connection(proxy.address, timeout=2)
        assert _talk(sock, b"warm") == b"warm"  # the upstream connection is made
        proxy.slow(0.3)
        for word in (b"one", b"two"):
            t = time.monotonic()
            assert _talk(sock, word) == word
            assert time.monotonic() - t >= 0.3  # held half each way, never sent early
        payload = bytes(range(256)) * 2000  # many chunks: order and content kept
        sock.sendall(payload)
        got = b""
        while len(got) < len(payload):
            got += sock.recv(65536)
        assert got == payload
        proxy.heal()
        assert proxy.one_way == 0 and _talk(sock, b"healed") == b"healed"
    finally:
        proxy.close()


def _shared_postmaster_started() -> str:
    out = subprocess.run(
        [
            "psql",
            "-h",
            "127.0.0.1",
            "-p",
            "5432",
            "-U",
            "postgres",
            "-Atc",
            "SELECT pg_postmaster_start_time()",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return out.stdout.strip()


def test_private_postgres_restarts_and_dies_beside_the_shared_server():
    from sqlalchemy import create_engine, text

    shared = _shared_postmaster_started()
    pg = PrivatePostgres()
    try:
        pg.start()
        url = pg.create_database("harness")

        def ask() -> int:
            engine = create_engine(url)
            try:
                with engine.connect() as conn:
                    return int(conn.execute(text("SELECT count(*) FROM jobs")).scalar_one())
            finally:
                engine.dispose()

        assert ask() == 0
        pg.kill()
        assert pg.postmaster_pid() is None
        with pytest.raises(Exception, match="refused|could not connect"):
            ask()
        pg.start()
        assert ask() == 0  # crash recovery kept the schema
        pg.restart(down_for=0.2)
        assert ask() == 0
    finally:
        pg.close()
    assert not pg.root.exists()
    assert _shared_postmaster_started() == shared


def _shared_rabbit_pid() -> str:
    out = subprocess.run(
        ["rabbitmqctl", "-q", "eval", "os:getpid()."], capture_output=True, text=True, timeout=60, check=True
    )
    return out.stdout.strip()


def test_private_rabbitmq_node_runs_and_dies_beside_the_shared_node(lab):
    from kombu import Connection

    shared = _shared_rabbit_pid()
    with lab.extra_rabbit(consumer_timeout_ms=20_000) as node:
        assert node.port != 5672
        assert "consumer_timeout,20000" in node.ctl("environment").replace(" ", "")
        url = node.add_vhost("harness")
        with Connection(url) as conn:
            queue = conn.SimpleQueue("harness")
            queue.put({"n": 1})
            assert queue.get(timeout=5).payload == {"n": 1}
            queue.close()
        node.kill()
        assert node.pid() is None
        node.start()
        with Connection(url, connect_timeout=5) as conn:
            conn.ensure_connection(max_retries=1)
    assert _shared_rabbit_pid() == shared


def test_receiver_verifies_signatures_and_really_goes_down():
    secret = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    receiver = VerifyingReceiver(secret)
    try:
        body = '{"type": "job.succeeded", "timestamp": "x", "data": {"id": "j1"}}'
        now = datetime.datetime.now(tz=datetime.UTC)
        signature = standardwebhooks.Webhook(secret).sign("msg_1", now, body)
        headers = {
            "webhook-id": "msg_1",
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": signature,
        }
        assert requests.post(receiver.url, data=body, headers=headers, timeout=5).status_code == 200
        assert requests.post(receiver.url, data=body + " ", headers=headers, timeout=5).status_code == 400
        assert receiver.rejected == 1
        assert receiver.terminal_ids() == {("j1", "job.succeeded"): {"msg_1"}}
        receiver.down()
        with pytest.raises(requests.ConnectionError):
            requests.post(receiver.url, data=body, headers=headers, timeout=5)
        receiver.up()
        assert requests.post(receiver.url, data=body, headers=headers, timeout=5).status_code == 200
    finally:
        receiver.close()


def test_tally_counts_each_column():
    def row(
        job_id: str,
        status: str,
        *,
        terminal: int = 1,
        outputs: int = 1,
        started: int = 1,
        code: str | None = None,
    ) -> dict:
        return {
            "id": job_id,
            "status": status,
            "error_code": code,
            "params": {},
            "terminal_events": terminal,
            "started_events": started,
            "outputs": outputs,
        }

    rows = [
        row("ok", "succeeded"),
        row("twice", "succeeded", terminal=2, outputs=2, started=2),
        row("failed", "failed", outputs=0, code="too_many_attempts"),
        row("stuck", "running", terminal=0, outputs=0),
    ]
    tally = Tally("t")
    accepted = {"ok", "twice", "failed", "stuck", "gone"}
    by_id = count_jobs(tally, rows, accepted)
    count_webhooks(
        tally, by_id, accepted, {("ok", "job.succeeded"): {"a", "b"}, ("twice", "job.succeeded"): {"c"}}
    )
    assert (tally.accepted, tally.succeeded_once, tally.lost, tally.recorded_twice, tally.stuck) == (
        5,
        1,
        1,
        1,
        1,
    )
    assert tally.failed == Counter({"too_many_attempts": 1})
    assert (tally.reruns, tally.dup_webhook_ids, tally.webhooks_missing) == (1, 1, 1)  # "failed" got none
    assert not tally.done
    assert set(tally.failures) >= {"lost=1", "recorded_twice=1", "stuck=1", "dup_webhook_ids=1"}
    table = format_table([tally])
    assert "too_many_attempts:1" in table and table.splitlines()[2].rstrip().endswith("NO")
    clean = Tally("clean", accepted=1, succeeded_once=1)
    clean.check("expected", True)
    assert clean.done
    clean.check("expected", False, "why")
    assert clean.failures == ["expected: why"]
