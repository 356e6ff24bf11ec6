"""The ingress loop: messages in, jobs out, acknowledged only once their jobs are committed.

Messages are taken in batches (up to ``INGRESS_BATCH_SIZE``, or what arrived within
``INGRESS_BATCH_LINGER``). A batch is one transaction: each message is read and validated
(``messages``), its tenant authenticated, its ``message_id`` looked up as an idempotency key (one
query for the batch), and each new job planned and inserted through the job service. After the
commit, refused messages go to the dead-letter queue (publisher-confirmed) with their reason, an
error reply goes to ``reply_to`` when there is one, and the whole batch is acknowledged with one
``multiple`` ack. So:

- killed before the commit, nothing was written and the broker redelivers every message;
- killed between the commit and the ack, the redelivered messages find their jobs by
  ``message_id`` and are acknowledged as replays: one job per message, never two;
- a database (or storage) outage gives the batch back unacknowledged (the connection is closed), and
  the ingress waits for the database before it consumes again: nothing is lost or refused for it;
- a batch that races another replica on one ``message_id`` (a unique-key violation) is written
  again one message at a time, where the job service answers the loser with the winner's job.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import pika
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection
from pika.exceptions import AMQPError
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker

from api.auth import KeyCache, authenticate
from inference_server.db import Tenant
from inference_server.errors import Conflict, InferenceError, Unauthorized
from inference_server.ingress import metrics
from inference_server.ingress.broker import PERSISTENT, connection_parameters, declare
from inference_server.ingress.health import Health
from inference_server.ingress.messages import Request, parse, reply_of
from inference_server.ingress.replies import ReplyFailed, error_reply, publish_confirmed
from inference_server.jobs import service
from inference_server.jobs.persist import insert_many
from inference_server.jobs.service import JobContext, request_hash
from inference_server.settings import Settings

log = logging.getLogger(__name__)
MAX_BACKOFF = 10.0
# Never copied into the dead-letter queue: the API key a refused message carried.
SECRET_HEADERS = frozenset({"authorization"})


class Unavailable(Exception):
    """A dependency (the database, the storage) is down: give the batch back and wait."""


@dataclass
class Delivery:
    tag: int
    properties: pika.BasicProperties
    body: bytes
    routing_key: str
    arrived: float  # time.monotonic()


@dataclass
class Refusal:
    delivery: Delivery
    code: str
    message: str


@dataclass
class Written:
    created: int = 0
    replayed: int = 0


class Ingress:
    """Consumes ``INGRESS_QUEUE`` until ``stop`` is set: ``run(stop)``."""

    def __init__(
        self, settings: Settings, session_factory: sessionmaker[Session], ctx: JobContext, health: Health
    ) -> None:
        self.settings = settings
        self.sf = session_factory
        self.ctx = ctx
        self.health = health
        self.keys = KeyCache()
        self._users: dict[str, tuple[Tenant, float]] = {}  # user_id -> tenant, for INGRESS_TRUST_USER_ID
        self._publisher: BlockingChannel | None = None

    # -- connections ------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Consume until ``stop``; reconnect after any broker or database failure, with backoff."""
        backoff = 0.5
        while not stop.is_set():
            try:
                self._wait_for_database(stop)
                if stop.is_set():
                    break
                connection = BlockingConnection(connection_parameters(self.settings.broker_url))
                try:
                    backoff = 0.5
                    self._consume(connection, stop)
                finally:
                    self.health.consuming = False
                    _close(connection)  # what was not acknowledged goes back to the queue
            except Unavailable as exc:
                metrics.DATABASE_ERRORS.inc()
                self.health.database_ok = False
                self.health.detail = f"dependency unavailable: {exc}"
                log.warning("ingress: %s; the batch goes back to the queue", exc)
            except (AMQPError, OSError) as exc:
                self.health.detail = f"broker unavailable: {type(exc).__name__}"
                log.warning("ingress: broker connection failed (%s: %s)", type(exc).__name__, exc)
            stop.wait(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)

    def _wait_for_database(self, stop: threading.Event) -> None:
        """Return once the database answers (or ``stop``): consuming without it only bounces messages."""
        wait = 0.5
        while not stop.is_set():
            try:
                with self.sf() as session:
                    session.execute(text("SELECT 1"))
                self.health.database_ok = True
                return
            except (OperationalError, InterfaceError, PoolTimeout, DBAPIError) as exc:
                self.health.database_ok = False
                self.health.detail = "database unavailable"
                log.warning("ingress: database unavailable (%s); waiting", type(exc).__name__)
                stop.wait(wait)
                wait = min(wait * 2, MAX_BACKOFF)

    def _consume(self, connection: BlockingConnection, stop: threading.Event) -> None:
        s = self.settings
        channel = connection.channel()
        declare(channel, s)
        channel.basic_qos(prefetch_count=s.ingress_prefetch)
        self._publisher = connection.channel()
        self._publisher.confirm_delivery()
        self.health.consuming, self.health.detail = True, "consuming"
        log.info("ingress consuming %s (batches of up to %d)", s.ingress_queue, s.ingress_batch_size)
        batch: list[Delivery] = []
        for method, properties, body in channel.consume(
            s.ingress_queue, inactivity_timeout=s.ingress_batch_linger
        ):
            if method is not None:
                batch.append(
                    Delivery(method.delivery_tag, properties, body, method.routing_key, time.monotonic())
                )
            full = len(batch) >= s.ingress_batch_size
            due = bool(batch) and (
                method is None or time.monotonic() - batch[0].arrived >= s.ingress_batch_linger
            )
            if full or due or (batch and stop.is_set()):
                self._handle(channel, batch)
                batch = []
            if stop.is_set():
                break
        channel.cancel()

    # -- one batch ----------------------------------------------------------------------------------

    def _handle(self, channel: BlockingChannel, batch: list[Delivery]) -> None:
        """Write the batch, refuse what it refused, acknowledge all of it."""
        refusals: list[Refusal] = []
        requests: list[tuple[Delivery, Request]] = []
        for d in batch:
            try:
                requests.append((d, parse(d.properties, d.body, d.routing_key)))
            except InferenceError as exc:
                refusals.append(Refusal(d, exc.code, exc.message))
            except Exception:  # a bug on one message must not stall the queue behind it
                log.exception("ingress: reading message %s failed", d.properties.message_id)
                refusals.append(Refusal(d, "internal_error", "the ingress could not read this message"))
        written = self._write(requests, refusals)
        self.health.database_ok = True
        for refusal in refusals:
            self._refuse(refusal)
        channel.basic_ack(batch[-1].tag, multiple=True)
        now = time.monotonic()
        for d in batch:
            metrics.ACK_SECONDS.observe(now - d.arrived)
        metrics.MESSAGES.labels(outcome="created").inc(written.created)
        metrics.MESSAGES.labels(outcome="replayed").inc(written.replayed)
        metrics.MESSAGES.labels(outcome="rejected").inc(len(refusals))

    def _write(self, requests: list[tuple[Delivery, Request]], refusals: list[Refusal]) -> Written:
        try:
            try:
                written = self._transaction(requests, refusals)
            except DBAPIError as exc:
                if _unavailable(exc):
                    raise
                # A unique key (a replica committed one of these message_ids meanwhile) or a row the
                # database refused: one message at a time, so the job service's replay answers a
                # race's loser with the winner's job, and only a message the database refuses is.
                written = Written()
                for item in requests:
                    one = self._one(item, refusals)
                    written.created += one.created
                    written.replayed += one.replayed
        except DBAPIError as exc:
            if _unavailable(exc):
                raise Unavailable(f"database: {type(exc).__name__}") from exc
            raise
        except PoolTimeout as exc:
            raise Unavailable("database: no connection in time") from exc
        if written.created and self.ctx.on_published:
            self.ctx.on_published()
        return written

    def _one(self, item: tuple[Delivery, Request], refusals: list[Refusal]) -> Written:
        for last in (False, True):
            try:
                return self._transaction([item], refusals)
            except IntegrityError:
                if last:  # still a conflict after the winner committed: not a race
                    break
            except DBAPIError as exc:
                if _unavailable(exc):
                    raise
                break
        log.error("ingress: the database refused message %s", item[0].properties.message_id)
        refusals.append(Refusal(item[0], "internal_error", "the job could not be stored"))
        return Written()

    def _transaction(self, requests: list[tuple[Delivery, Request]], refusals: list[Refusal]) -> Written:
        """One transaction for ``requests``; appends to ``refusals`` only once it committed."""
        refused: list[Refusal] = []
        written = Written()
        with self.sf() as session:
            authed: list[tuple[Delivery, Request, Tenant]] = []
            for d, r in requests:
                try:
                    authed.append((d, r, self._tenant(session, r)))
                except Unauthorized as exc:
                    refused.append(Refusal(d, exc.code, exc.message))
            existing = service.by_idempotency_keys(session, [(t.id, r.message_id) for _, r, t in authed])
            planned: dict[tuple[str, str], str] = {}  # this batch's new keys -> their body's hash
            rows = []
            for d, r, tenant in authed:
                key, digest = (tenant.id, r.message_id), request_hash(r.job)
                try:
                    if key in existing:
                        service.replay(existing[key], digest)  # a conflict raises
                        written.replayed += 1
                        continue
                    if key in planned:
                        if planned[key] != digest:
                            raise Conflict(
                                "this message_id was already used with another body",
                                code="idempotency_conflict",
                            )
                        written.replayed += 1
                        continue
                    job = service.plan(
                        session, self.ctx, tenant, r.job, idempotency_key=r.message_id, reply=r.reply
                    )
                except InferenceError as exc:
                    if exc.status == 503:  # storage down: transient, not the message's fault
                        raise Unavailable(f"{exc.code}: {exc.message}") from exc
                    refused.append(Refusal(d, exc.code, exc.message))
                    continue
                except Exception:  # a bug on one message must not stall the queue behind it
                    log.exception("ingress: planning message %s failed", r.message_id)
                    refused.append(Refusal(d, "internal_error", "the ingress could not handle this request"))
                    continue
                rows.append(job.rows)
                planned[key] = digest
                written.created += 1
            if rows:
                insert_many(session, rows)
            session.commit()
        metrics.BATCH_SIZE.observe(len(requests))
        refusals.extend(refused)
        return written

    def _tenant(self, session: Session, r: Request) -> Tenant:
        if r.authorization or not (r.user_id and self.settings.ingress_trust_user_id):
            return authenticate(session, r.authorization, self.keys).tenant
        cached = self._users.get(r.user_id)
        if cached and cached[1] > time.monotonic():
            return cached[0]
        tenant = session.scalar(select(Tenant).where(Tenant.name == r.user_id))
        if tenant is None:
            raise Unauthorized(f"no tenant is named by user_id {r.user_id!r}", code="unknown_tenant")
        session.expunge(tenant)
        self._users[r.user_id] = (tenant, time.monotonic() + self.keys.ttl)
        return tenant

    # -- refusals -------------------------------------------------------------------------------------

    def _refuse(self, refusal: Refusal) -> None:
        """Dead-letter a refused message with its reason and send the error reply (both confirmed)."""
        d, publisher = refusal.delivery, self._publisher
        assert publisher is not None
        p = d.properties
        headers: dict[str, Any] = {
            k: v for k, v in (p.headers or {}).items() if k.lower() not in SECRET_HEADERS
        }
        headers.update(
            {"x-error-code": refusal.code, "x-error-message": refusal.message, "x-routing-key": d.routing_key}
        )
        dead = pika.BasicProperties(
            content_type=p.content_type,
            delivery_mode=PERSISTENT,
            message_id=p.message_id,
            correlation_id=p.correlation_id,
            reply_to=p.reply_to,
            timestamp=p.timestamp,
            type=p.type,
            headers=headers,
        )
        dead_queue = self.settings.ingress_dead_queue
        publish_confirmed(publisher, dead_queue, d.routing_key, d.body, dead, mandatory=False)
        metrics.REJECTED.labels(code=refusal.code).inc()
        log.info("ingress refused message %s: %s: %s", p.message_id, refusal.code, refusal.message)
        reply_to = reply_of(p)
        if reply_to:
            body, properties = error_reply(refusal.code, refusal.message, p.correlation_id, p.message_id)
            try:
                publish_confirmed(publisher, "", reply_to, body, properties, mandatory=False)
            except ReplyFailed as exc:  # the dead letter is the record; the reply is a courtesy
                log.warning("ingress: error reply to %s not taken: %s", reply_to, exc)


def _unavailable(exc: DBAPIError) -> bool:
    """A database that cannot be reached, rather than a statement it refused."""
    return isinstance(exc, OperationalError | InterfaceError) or exc.connection_invalidated


def _close(connection: BlockingConnection) -> None:
    with contextlib.suppress(AMQPError, OSError):
        if connection.is_open:
            connection.close()
