"""The ingress killed between its commit and its ack: the broker redelivers the message and the next
ingress maps it to the same job by ``message_id``. One job, not two, and it runs.

Made deterministic without a hook in the ingress: the test holds a lock that makes the ingress's
INSERT wait (so the message is in the ingress's hands, uncommitted), freezes the ingress's broker
link (a TCP proxy), releases the lock, sees the job committed, and kills the ingress. Its ack, if it
was sent at all, is held in the frozen link and never reaches the broker."""

from __future__ import annotations

import time
import uuid
from urllib.parse import urlsplit

from sqlalchemy import func, select, text

from inference_server.db import Job
from inference_server.devtools.faults.proxy import TcpProxy
from tests.support.amqp import Amqp, counter, start_ingress
from tests.support.waiting import wait_for
from tests.test_ingress import BODY


def _jobs(system_db, key: str) -> list[Job]:  # type: ignore[no-untyped-def]
    with system_db() as session:
        return list(session.scalars(select(Job).where(Job.idempotency_key == key)))


def _waiting_on_lock(session, name: str) -> bool:  # type: ignore[no-untyped-def]
    query = text(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND application_name = :name AND wait_event_type = 'Lock'"
    )
    waiting = bool(session.execute(query, {"name": name}).scalar())
    # A transaction lists the sessions of pg_stat_activity as they were at its first read of it (only
    # wait events are read live): end it, or a connection the ingress opens later is never seen.
    session.rollback()
    return waiting


def _where_it_is(session, amqp: Amqp, name: str) -> str:  # type: ignore[no-untyped-def]
    """What the broker and the database show of the ingress, for a failure's message."""
    session.rollback()  # a fresh view of pg_stat_activity
    queue = amqp.channel.queue_declare("inference.requests", passive=True).method
    query = text(
        "SELECT state, wait_event_type, wait_event, left(query, 80) FROM pg_stat_activity "
        "WHERE datname = current_database() AND application_name = :name"
    )
    sessions = [tuple(row) for row in session.execute(query, {"name": name})]
    return (
        f"the queue holds {queue.message_count} ready message(s) and has {queue.consumer_count} "
        f"consumer(s); the ingress's database sessions: {sessions}"
    )


def test_an_ingress_killed_between_commit_and_ack_leaves_one_job(  # type: ignore[no-untyped-def]
    system_env, logs_dir, api_server, worker, dispatcher, broker_url, tenant, system_db
):
    parts = urlsplit(broker_url)
    proxy = TcpProxy((parts.hostname or "127.0.0.1", parts.port or 5672), name="ingress-broker")
    proxied = parts._replace(netloc=f"{parts.username}:{parts.password}@127.0.0.1:{proxy.port}").geturl()
    env = dict(system_env, API_URL=api_server)
    # Its database sessions are told apart by their application_name (libpq reads it from the URL).
    url = system_env["DATABASE_URL"]
    database = f"{url}{'&' if '?' in url else '?'}application_name=ingress-killed"
    first = start_ingress(
        dict(env, BROKER_URL=proxied, DATABASE_URL=database), logs_dir, name="ingress-killed"
    )
    second = None
    amqp = Amqp.open(broker_url)
    message_id = uuid.uuid4().hex
    try:
        with system_db() as locker:
            locker.execute(text("LOCK TABLE jobs IN SHARE MODE"))  # INSERTs wait; reads go on
            amqp.submit(BODY, api_key=tenant.api_key, message_id=message_id)
            with system_db() as watcher:
                try:
                    wait_for(
                        lambda: _waiting_on_lock(watcher, "ingress-killed"),
                        30,
                        what="the ingress's INSERT waiting",
                    )
                except AssertionError as exc:  # say where the message and the ingress are instead
                    where = _where_it_is(watcher, amqp, "ingress-killed")
                    raise AssertionError(f"{exc}; {where}; the ingress's log:\n{first.tail()}") from None
            proxy.blackhole()  # from here nothing the ingress sends reaches the broker
            locker.rollback()  # the lock goes; the ingress commits
        wait_for(lambda: _jobs(system_db, message_id), 20, what="the job committed by the first ingress")
        time.sleep(0.3)  # the ack, if sent, sits in the frozen link
        first.kill(9)
        proxy.cut()  # the broker sees the connection end: the unacknowledged message is redelivered
        second = start_ingress(env, logs_dir, name="ingress-second")
        wait_for(
            lambda: counter(second, "inference_ingress_messages_total", outcome="replayed") >= 1,
            30,
            what="the redelivered message taken as a replay",
        )
        assert counter(second, "inference_ingress_messages_total", outcome="created") == 0
        [job] = _jobs(system_db, message_id)

        def finished() -> bool:
            with system_db() as session:
                return session.get(Job, job.id).status == "succeeded"  # type: ignore[union-attr]

        wait_for(finished, 60, what="the job to run to success")
        with system_db() as session:
            count = select(func.count()).select_from(Job).where(Job.idempotency_key == message_id)
            assert session.scalar(count) == 1
    finally:
        amqp.close()
        first.kill(9)
        if second is not None:
            second.kill(15)
        proxy.close()
