"""The dispatcher: turns events into deliveries and sends them, in its own process.

Durability comes from the database: a delivery is claimed (``FOR UPDATE SKIP LOCKED``, so any
number of dispatchers can run side by side), marked ``sending`` with a lease, sent outside any
transaction, and its result recorded under the claim token. A dispatcher that dies mid-send leaves
rows whose lease expires and which another dispatcher sends again (at least once, same event id).

Isolation: requests run on a bounded thread pool (``webhook_concurrency``) and each URL has a share
of it that depends on how it behaves (see ``UrlLimits``), so a slow receiver slows only itself.

The loop also repairs lost chain cursors (``chain.sweep``) and prunes what has outlived its
retention (``retention.Pruner``), a bounded slice at a time.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session, sessionmaker

from inference_server import netguard
from inference_server.db import Job, JobEvent, Tenant
from inference_server.db.base import new_id, utcnow
from inference_server.jobs.serialize import with_api_base
from inference_server.logs import job_context
from inference_server.settings import Settings
from inference_server.storage import Storage, open_storage
from webhooks.chain import sweep
from webhooks.delivery import AttemptResult, attempt, encode_body
from webhooks.fanout import fan_out
from webhooks.profiles import split_attempt
from webhooks.recording import Claimed, record_results
from webhooks.replies import AmqpReplies
from webhooks.retention import Pruner
from webhooks.secrets import signing_secrets
from webhooks.tables import DeliveryKind, DeliveryStatus, WebhookDelivery
from webhooks.transport import PinnedPool

log = logging.getLogger(__name__)
# Repairs of lost chain cursors: every few seconds over recently changed rows, and now and then
# (and at start) over all of them, in case the dispatchers were away when a cursor was lost.
SWEEP_INTERVAL = 5.0
SWEEP_WINDOW = 600.0
FULL_SWEEP_INTERVAL = 600.0
# Pruning shares the loop: at most this long per turn, and while a backlog lasts one turn per
# PRUNE_BACKLOG_GAP, so deliveries never wait long behind it.
PRUNE_BUDGET = 0.25
PRUNE_BACKLOG_GAP = 1.0
SLOW_SECONDS = 1.0  # a URL whose recent attempts average more than this is slow


class UrlLimits:
    """How many concurrent requests a URL may have: a new URL gets half the pool, a URL that answers
    fast gets all of it, a slow or failing-by-timeout one an eighth. Latency is a moving average."""

    def __init__(self, concurrency: int, unknown: int | None = None, max_urls: int = 10_000) -> None:
        self.fast = 2 * concurrency  # everything the loop may have claimed (see Dispatcher._step)
        self.unknown = unknown or max(1, concurrency // 2)
        self.slow = max(1, concurrency // 8)
        self._latency: OrderedDict[str, float] = OrderedDict()
        self._max_urls = max_urls

    def limit(self, url: str) -> int:
        latency = self._latency.get(url)
        if latency is None:
            return self.unknown
        return self.slow if latency > SLOW_SECONDS else self.fast

    def observe(self, url: str, seconds: float) -> None:
        old = self._latency.pop(url, None)
        self._latency[url] = seconds if old is None else 0.7 * old + 0.3 * seconds
        if len(self._latency) > self._max_urls:
            self._latency.popitem(last=False)


class Dispatcher:
    """Fans events out and delivers them: ``run(stop)`` loops until ``stop`` is set; ``run_once()``
    is one pass (tests, tools)."""

    def __init__(
        self,
        settings: Settings,
        session_factory: sessionmaker[Session],
        *,
        batch_size: int = 500,
        per_url_limit: int | None = None,
    ) -> None:
        self.settings = settings
        self.session_factory = session_factory
        self.batch_size = batch_size
        self.concurrency = max(1, settings.webhook_concurrency)
        self.limits = UrlLimits(self.concurrency, per_url_limit)
        self.delays = list(settings.webhook_retry_delays)
        # Longer than any attempt can take, so a live dispatcher never loses its lease mid-send.
        self.lease = timedelta(seconds=2 * settings.webhook_timeout + 30)
        self.http = PinnedPool()
        self.pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="webhook")
        self.engine: Engine = session_factory.kw["bind"]
        self.skip_locked = self.engine.dialect.name == "postgresql"
        self._conn: Connection | None = None
        self._lock = threading.Lock()
        self._done: list[tuple[Claimed, AttemptResult]] = []
        self._wake = threading.Event()
        self._inflight: Counter[str] = Counter()  # per URL
        self._next_fanout = 0.0
        self.pruner = Pruner(settings, self._transaction, skip_locked=self.skip_locked, storage=self._storage)
        self._next_prune = 0.0
        self._amqp: AmqpReplies | None = None  # connected at the first AMQP reply

    def _storage(self) -> Storage:
        return open_storage(self.settings)  # only with OUTPUT_TTL_DAYS: the first expired output

    # -- the loop ---------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Deliver until ``stop`` is set, then finish the requests in flight and record them."""
        next_sweep = next_full_sweep = 0.0
        while not stop.is_set():
            try:
                if time.monotonic() >= next_sweep:
                    full = time.monotonic() >= next_full_sweep
                    with self._transaction() as session:
                        sweep(session, max_age=None if full else SWEEP_WINDOW)
                    next_sweep = time.monotonic() + SWEEP_INTERVAL
                    if full:
                        next_full_sweep = time.monotonic() + FULL_SWEEP_INTERVAL
                busy = self._step()
            except Exception:  # the database blinked: keep the process, retry shortly
                log.exception("webhook dispatcher step failed")
                busy = False
                stop.wait(1.0)
            self._prune()
            if not busy:
                self._wake.wait(self.settings.webhook_poll_interval)
                self._wake.clear()
        try:
            self._drain(timeout=self.settings.webhook_timeout + 5)
        except Exception:  # unrecorded results are sent again by whoever takes over the lease
            log.exception("webhook dispatcher could not record its last results")

    def run_once(self) -> int:
        """Fan out every waiting event, send the due deliveries, wait for them; return attempts made."""
        with self._transaction() as session:
            while (
                fan_out(session, batch_size=self.batch_size, skip_locked=self.skip_locked) == self.batch_size
            ):
                pass
            sweep(session, min_age=0)
        claimed = self._claim(self.batch_size)
        futures = [self._submit(c) for c in claimed]
        for f in futures:
            f.result()
        self._record(self._take_done())
        return len(claimed)

    @contextmanager
    def _transaction(self) -> Iterator[Session]:
        """A transaction on the dispatcher's own connection.

        One connection held by the loop (rather than one checked out, pinged and returned per
        transaction) saves two round trips per transaction. On PostgreSQL it runs with
        ``synchronous_commit = off``: a commit lost in a database crash only means a delivery is sent
        again (its lease expires, or its claim is undone), never that an event is lost; it halves the
        cost of a delivery here. The setting stays on this connection, which no one else uses."""
        if self._conn is None or self._conn.closed or self._conn.invalidated:
            self._connect()
        assert self._conn is not None
        try:
            with Session(bind=self._conn, expire_on_commit=False) as session, session.begin():
                yield session
        except Exception:
            # Whatever broke (a lost connection included), start the next transaction afresh.
            self._conn.close()
            self._conn = None
            raise

    def _connect(self) -> None:
        self._conn = self.engine.connect()
        if self.skip_locked:
            self._conn.exec_driver_sql("SET synchronous_commit = off")
            self._conn.commit()

    def _replies(self) -> AmqpReplies:
        with self._lock:
            if self._amqp is None:
                self._amqp = AmqpReplies(self.settings.broker_url)
            return self._amqp

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.http.close()
        if self._amqp is not None:
            self._amqp.close()
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _step(self) -> bool:
        busy = False
        done = self._take_done()
        if done:
            self._record(done)
            busy = True
        # Fan out when the last pass found work, otherwise once per poll interval: an idle query per
        # step would cost more than the deliveries it schedules.
        if time.monotonic() >= self._next_fanout:
            with self._transaction() as session:
                taken = fan_out(session, batch_size=self.batch_size, skip_locked=self.skip_locked)
            self._next_fanout = 0.0 if taken else time.monotonic() + self.settings.webhook_poll_interval
            busy |= taken > 0
        # Claim up to twice the pool: the queue keeps threads busy while the loop records and claims,
        # and bigger batches spread each transaction over more deliveries.
        free = 2 * self.concurrency - sum(self._inflight.values())
        if free >= max(1, self.concurrency // 4) or not self._inflight:
            for claimed in self._claim(free):
                self._submit(claimed)
                busy = True
        return busy

    def _prune(self) -> None:
        """A turn of retention pruning when one is due; its failures never stop deliveries."""
        if time.monotonic() < self._next_prune:
            return
        try:
            more = self.pruner.step(PRUNE_BUDGET)
        except Exception:  # the database or the storage blinked: try again at the next interval
            log.exception("retention pruning failed")
            more = False
        self._next_prune = time.monotonic() + (PRUNE_BACKLOG_GAP if more else self.settings.prune_interval)

    def _drain(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while sum(self._inflight.values()) and time.monotonic() < deadline:
            done = self._take_done()
            if done:
                self._record(done)
            else:
                self._wake.wait(0.05)
                self._wake.clear()

    # -- claiming -----------------------------------------------------------------------------

    def _claim(self, limit: int) -> list[Claimed]:
        """Lease up to ``limit`` due deliveries (chain heads only: later events of a job are ``waiting``)."""
        d = WebhookDelivery
        now = utcnow()
        room = {url: self.limits.limit(url) - n for url, n in self._inflight.items()}
        full = [url for url, r in room.items() if r <= 0]
        # A plain walk of the partial due index; no joins here, so the planner cannot pick a plan
        # that reads every due row before the LIMIT.
        stmt = select(d.id, d.url).where(d.status.in_(DeliveryStatus.ACTIVE), d.next_attempt_at <= now)
        if full:
            stmt = stmt.where(d.url.not_in(full))
        stmt = stmt.order_by(d.next_attempt_at).limit(limit)
        if self.skip_locked:
            stmt = stmt.with_for_update(skip_locked=True)
        token = new_id()
        with self._transaction() as session:
            ids: list[str] = []
            for row in session.execute(stmt):
                left = room.get(row.url, self.limits.limit(row.url))
                if left <= 0:
                    continue  # left pending, untouched: taken when this URL has room again
                room[row.url] = left - 1
                ids.append(row.id)
            if not ids:
                return []
            rows = session.execute(
                select(
                    d.id,
                    d.url,
                    d.event_id,
                    d.attempts,
                    d.retry_base,
                    d.tenant_id,
                    d.job_id,
                    d.event_seq,
                    d.kind,
                    d.event_type,
                    JobEvent.payload,
                    Tenant.webhook_secret,
                    Tenant.previous_webhook_secret,
                    Tenant.previous_secret_expires_at,
                    Tenant.webhook_token,
                    Job.correlation_id,
                    Job.idempotency_key,
                )
                .join(JobEvent, JobEvent.seq == d.event_seq)
                .join(Tenant, Tenant.id == d.tenant_id)
                .join(Job, Job.id == d.job_id)
                .where(d.id.in_(ids))
            ).all()
            session.execute(
                update(d)
                .where(d.id.in_(ids))
                .values(
                    status=DeliveryStatus.SENDING,
                    claim_token=token,
                    next_attempt_at=now + self.lease,
                    updated_at=now,
                ),
                execution_options={"synchronize_session": False},
            )
        return [self._claimed(row, token, now) for row in rows]

    def _claimed(self, row: Any, token: str, now: datetime) -> Claimed:
        payload = with_api_base(row.payload, self.settings.api_url)
        kind = row.kind or DeliveryKind.STANDARD
        return Claimed(
            id=row.id,
            token=token,
            url=row.url,
            event_id=row.event_id,
            attempts=row.attempts,
            retry_base=row.retry_base,
            tenant_id=row.tenant_id,
            job_id=row.job_id,
            event_seq=row.event_seq,
            body=b"" if kind == DeliveryKind.SPLIT else encode_body(payload),
            secrets=signing_secrets(row, now),
            kind=kind,
            event_type=row.event_type,
            payload=payload if kind == DeliveryKind.SPLIT else None,
            bearer=row.webhook_token,
            correlation_id=row.correlation_id,
            request_key=row.idempotency_key,
        )

    # -- sending ------------------------------------------------------------------------------

    def _submit(self, claimed: Claimed) -> Future[None]:
        self._inflight[claimed.url] += 1
        return self.pool.submit(self._send, claimed)

    def _send(self, c: Claimed) -> None:
        try:
            if c.kind == DeliveryKind.AMQP:
                result = self._replies().send(c)
            elif c.kind == DeliveryKind.SPLIT:
                assert c.payload is not None
                result = split_attempt(
                    self.http,
                    c,
                    allow_private=self.settings.allow_private_networks,
                    timeout=self.settings.webhook_timeout,
                )
            else:
                result = attempt(
                    self.http,
                    c.url,
                    c.event_id,
                    c.body,
                    c.secrets,
                    allow_private=self.settings.allow_private_networks,
                    timeout=self.settings.webhook_timeout,
                )
        except Exception as exc:  # a bug must not leave the row leased until the lease expires
            with job_context(job_id=c.job_id, tenant=c.tenant_id):
                log.exception("webhook attempt crashed")
            result = AttemptResult(utcnow(), 0.0, error=netguard.describe(exc))
        with self._lock:
            self._done.append((c, result))
        self._wake.set()

    def _take_done(self) -> list[tuple[Claimed, AttemptResult]]:
        with self._lock:
            done, self._done = self._done, []
        for c, r in done:
            self.limits.observe(c.url, r.duration)
            self._inflight[c.url] -= 1
            if self._inflight[c.url] <= 0:
                del self._inflight[c.url]
        return done

    def _record(self, done: list[tuple[Claimed, AttemptResult]]) -> None:
        try:
            with self._transaction() as session:
                record_results(session, done, self.delays)
        except Exception:
            with self._lock:  # keep the results for the next step rather than send them again
                self._done[:0] = done
            for c, _ in done:
                self._inflight[c.url] += 1
            raise
