"""The dispatcher: turns events into deliveries and sends them, in its own process.

Durability comes from the database: a delivery is claimed (``FOR UPDATE SKIP LOCKED``, so any
number of dispatchers can run side by side), marked ``sending`` with a lease, sent outside any
transaction, and its result recorded under the claim token. A dispatcher that dies mid-send leaves
rows whose lease expires and which another dispatcher sends again (at least once, same event id).

Isolation: requests run on a bounded thread pool (``webhook_concurrency``), and one URL gets at
most ``per_url_limit`` of its slots, so a slow receiver slows only its own deliveries.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from inference_server import netguard
from inference_server.db import JobEvent, Tenant
from inference_server.db.base import new_id, utcnow
from inference_server.settings import Settings
from webhooks import metrics
from webhooks.delivery import AttemptResult, attempt, encode_body, plan_next
from webhooks.fanout import fan_out, url_hash
from webhooks.secrets import signing_secrets
from webhooks.tables import DeliveryStatus, WebhookAttempt, WebhookDelivery, WebhookGoneURL

log = logging.getLogger(__name__)
ACTIVE = DeliveryStatus.ACTIVE


@dataclass(frozen=True)
class Claimed:
    """A delivery this dispatcher holds the lease on, with everything needed to send it."""

    id: str
    token: str
    url: str
    event_id: str
    attempts: int
    retry_base: int
    tenant_id: str
    body: bytes
    secrets: list[str]


class Dispatcher:
    """Fans events out and delivers them. ``run(stop)`` loops until ``stop`` is set; ``run_once()`` is one pass."""

    def __init__(
        self,
        settings: Settings,
        session_factory: Callable[[], Session],
        *,
        batch_size: int = 500,
        per_url_limit: int | None = None,
    ) -> None:
        self.settings = settings
        self.session_factory = session_factory
        self.batch_size = batch_size
        self.concurrency = max(1, settings.webhook_concurrency)
        self.per_url_limit = per_url_limit or max(1, self.concurrency // 4)
        self.delays = list(settings.webhook_retry_delays)
        # Longer than any attempt can take, so a live dispatcher never loses its lease mid-send.
        self.lease = timedelta(seconds=2 * settings.webhook_timeout + 30)
        self.adapter = netguard.new_adapter(self.concurrency)
        self.pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="webhook")
        with session_factory() as session:
            self.skip_locked = session.get_bind().dialect.name == "postgresql"
        self._lock = threading.Lock()
        self._done: list[tuple[Claimed, AttemptResult]] = []
        self._wake = threading.Event()
        self._inflight: Counter[str] = Counter()  # per URL

    # -- the loop ---------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Deliver until ``stop`` is set, then finish the requests in flight and record them."""
        while not stop.is_set():
            try:
                busy = self._step()
            except Exception:  # the database blinked: keep the process, retry shortly
                log.exception("webhook dispatcher step failed")
                busy = False
                stop.wait(1.0)
            if not busy:
                self._wake.wait(self.settings.webhook_poll_interval)
                self._wake.clear()
        self._drain(timeout=self.settings.webhook_timeout + 5)

    def run_once(self) -> int:
        """Fan out every waiting event, send the due deliveries, wait for them; return attempts made."""
        with self.session_factory() as session, session.begin():
            while fan_out(session, batch_size=self.batch_size, skip_locked=self.skip_locked) == self.batch_size:
                pass
        claimed = self._claim(self.batch_size)
        futures = [self._submit(c) for c in claimed]
        for f in futures:
            f.result()
        self._record(self._take_done())
        return len(claimed)

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.adapter.close()

    def _step(self) -> bool:
        busy = False
        done = self._take_done()
        if done:
            try:
                self._record(done)
            except Exception:
                with self._lock:  # keep the results for the next step rather than resend them
                    self._done[:0] = done
                raise
            busy = True
        with self.session_factory() as session, session.begin():
            busy |= fan_out(session, batch_size=self.batch_size, skip_locked=self.skip_locked) > 0
        free = self.concurrency - sum(self._inflight.values())
        if free > 0:
            for claimed in self._claim(free):
                self._submit(claimed)
                busy = True
        return busy

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
        """Lease up to ``limit`` due deliveries that are first in line for their job and URL."""
        d = WebhookDelivery
        earlier = aliased(WebhookDelivery)
        now = utcnow()
        full = [url for url, n in self._inflight.items() if n >= self.per_url_limit]
        # Per job and URL, events go out in order: nothing while an earlier one is waiting or sending,
        # or while an earlier event of the job is not fanned out yet.
        earlier_active = (
            select(earlier.id)
            .where(earlier.job_id == d.job_id, earlier.url == d.url, earlier.event_seq < d.event_seq,
                   earlier.status.in_(ACTIVE))
            .exists()
        )
        earlier_unfanned = (
            select(JobEvent.seq)
            .where(JobEvent.job_id == d.job_id, JobEvent.seq < d.event_seq, JobEvent.fanned_out.is_(False))
            .exists()
        )
        stmt = (
            select(d.id, d.url, d.event_id, d.attempts, d.retry_base, d.tenant_id, JobEvent.payload,
                   Tenant.webhook_secret, Tenant.previous_webhook_secret, Tenant.previous_secret_expires_at)
            .join(JobEvent, JobEvent.seq == d.event_seq)
            .join(Tenant, Tenant.id == d.tenant_id)
            .where(d.status.in_(ACTIVE), d.next_attempt_at <= now, ~earlier_active, ~earlier_unfanned)
            .order_by(d.next_attempt_at)
            .limit(limit)
        )
        if full:
            stmt = stmt.where(d.url.not_in(full))
        if self.skip_locked:
            stmt = stmt.with_for_update(of=d, skip_locked=True)
        token = new_id()
        claimed: list[Claimed] = []
        room = Counter({url: self.per_url_limit - n for url, n in self._inflight.items()})
        with self.session_factory() as session, session.begin():
            for row in session.execute(stmt):
                if room.get(row.url, self.per_url_limit) <= 0:
                    continue  # left pending, untouched: taken when this URL has room again
                room[row.url] = room.get(row.url, self.per_url_limit) - 1
                claimed.append(Claimed(
                    id=row.id, token=token, url=row.url, event_id=row.event_id, attempts=row.attempts,
                    retry_base=row.retry_base, tenant_id=row.tenant_id, body=encode_body(row.payload),
                    secrets=signing_secrets(row, now),  # type: ignore[arg-type]
                ))
            if claimed:
                session.execute(
                    update(d).where(d.id.in_([c.id for c in claimed])).values(
                        status=DeliveryStatus.SENDING, claim_token=token,
                        next_attempt_at=now + self.lease, updated_at=now,
                    ),
                    execution_options={"synchronize_session": False},
                )
        return claimed

    # -- sending ------------------------------------------------------------------------------

    def _submit(self, claimed: Claimed) -> Future[None]:
        self._inflight[claimed.url] += 1
        return self.pool.submit(self._send, claimed)

    def _send(self, c: Claimed) -> None:
        try:
            result = attempt(self.adapter, c.url, c.event_id, c.body, c.secrets,
                             allow_private=self.settings.allow_private_networks,
                             timeout=self.settings.webhook_timeout)
        except Exception as exc:  # a bug must not leave the row leased until the lease expires
            log.exception("webhook attempt crashed")
            result = AttemptResult(utcnow(), 0.0, error=netguard.describe(exc))
        with self._lock:
            self._done.append((c, result))
        self._wake.set()

    def _take_done(self) -> list[tuple[Claimed, AttemptResult]]:
        with self._lock:
            done, self._done = self._done, []
        for c, _ in done:
            self._inflight[c.url] -= 1
            if self._inflight[c.url] <= 0:
                del self._inflight[c.url]
        return done

    # -- recording ----------------------------------------------------------------------------

    def _record(self, done: list[tuple[Claimed, AttemptResult]]) -> None:
        """Store the results of finished attempts in one transaction, under each claim's token."""
        if not done:
            return
        now = utcnow()
        table = WebhookDelivery.__table__
        succeeded: list[dict[str, Any]] = []
        others: list[dict[str, Any]] = []
        attempts: list[dict[str, Any]] = []
        gone: set[tuple[str, str]] = set()
        for c, r in done:
            n = c.attempts + 1
            nxt = plan_next(r, n - c.retry_base, self.delays, now)
            row = {"b_id": c.id, "b_token": c.token, "status": nxt.status, "attempts": n,
                   "next_attempt_at": nxt.next_attempt_at, "last_status_code": r.status_code,
                   "last_error": r.error, "updated_at": now}
            (succeeded if nxt.status == DeliveryStatus.SUCCEEDED else others).append(row)
            attempts.append({"delivery_id": c.id, "number": n, "started_at": r.started_at,
                             "duration_ms": int(r.duration * 1000), "status_code": r.status_code,
                             "error": r.error})
            if nxt.status == DeliveryStatus.GONE:
                gone.add((c.tenant_id, c.url))
            metrics.DELIVERIES.labels(outcome=nxt.outcome).inc()
            metrics.ATTEMPT_SECONDS.observe(r.duration)
        base = (
            update(table)
            .where(table.c.id == bindparam("b_id"), table.c.claim_token == bindparam("b_token"))
        )
        fields = {k: bindparam(k) for k in ("status", "attempts", "next_attempt_at", "last_status_code",
                                              "last_error", "updated_at")}
        with self.session_factory() as session, session.begin():
            conn = session.connection()
            if succeeded:
                conn.execute(base.values(**fields, claim_token=None, delivered_at=bindparam("updated_at")),
                             succeeded)
            if others:
                conn.execute(base.values(**fields, claim_token=None), others)
            conn.execute(insert(WebhookAttempt.__table__), attempts)
            for tenant_id, url in gone:
                self._mark_gone(session, tenant_id, url)

    def _mark_gone(self, session: Session, tenant_id: str, url: str) -> None:
        """Remember a 410 and stop the URL's waiting deliveries (rows being sent finish on their own)."""
        try:
            with session.begin_nested():
                session.execute(insert(WebhookGoneURL).values(tenant_id=tenant_id, url=url, url_sha256=url_hash(url)))
        except IntegrityError:
            pass  # already known
        d = WebhookDelivery
        count = session.execute(
            update(d)
            .where(d.tenant_id == tenant_id, d.url == url, d.status == DeliveryStatus.PENDING)
            .values(status=DeliveryStatus.GONE, next_attempt_at=None, updated_at=utcnow(),
                    last_error="not sent: this URL answered 410 Gone"),
            execution_options={"synchronize_session": False},
        ).rowcount
        if count:
            metrics.DELIVERIES.labels(outcome=DeliveryStatus.GONE).inc(count)
