"""The outbox relay: publishes committed job messages to RabbitMQ with publisher confirms and stamps
them. It runs inside every `api` and `dispatcher` process and is the scheduler: it publishes only
what ``publish.scheduler`` picks (as many jobs as a family's workers have free slots, in priority
and fair-share order), one replica at a time under an advisory lock (a crash between the confirm
and the stamp can re-send a message: the worker recognises and drops such duplicates)."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from typing import Any

from celery import Celery
from kombu import Connection
from sqlalchemy.orm import Session, sessionmaker

from inference_server.publish import positions, scheduler
from inference_server.publish.confirms import ConfirmingChannel
from inference_server.publish.metrics import BATCH_SECONDS, FAILURES, PUBLISHED
from inference_server.publish.slots import SlotListener
from inference_server.publish.topology import DEAD_QUEUE, RUN_JOB, job_queue, message_app
from inference_server.settings import Settings

log = logging.getLogger(__name__)


class Relay:
    def __init__(
        self,
        app: Celery,
        session_factory: sessionmaker[Session],
        *,
        batch_size: int = 200,
        interval: float = 0.2,
        linger: float = 0.05,
        consumer_timeout_ms: int,
        schedule: scheduler.SchedulerConfig | None = None,
        position_interval: float = 1.0,
    ) -> None:
        self.app = app
        self.sf = session_factory
        self.batch_size = batch_size
        self.interval = interval
        self.linger = linger
        self.consumer_timeout_ms = consumer_timeout_ms
        self.schedule = schedule or scheduler.SchedulerConfig()
        self.position_interval = position_interval
        self._placed = 0.0  # monotonic time of the last position update
        self.saturated = False  # the last pass had waiting jobs and no free slot for any
        self.wake = threading.Event()
        self.freed = threading.Event()  # a worker slot freed (publish/slots.py)
        self._queues: dict[str, object] = {}
        self.published = 0
        self._channel: ConfirmingChannel | None = None
        self._declared: set[str] = set()

    @classmethod
    def from_settings(cls, session_factory: sessionmaker[Session], settings: Settings) -> Relay:
        return cls(
            message_app(settings.broker_url),
            session_factory,
            batch_size=settings.relay_batch_size,
            interval=settings.relay_interval,
            linger=settings.relay_linger,
            consumer_timeout_ms=settings.consumer_timeout_ms,
            schedule=scheduler.SchedulerConfig.from_settings(settings),
            position_interval=settings.queue_position_interval,
        )

    def _queue(self, name: str) -> object:
        """The queue an outbox row names (its family's registry queue), as the workers declare it."""
        if name not in self._queues:
            self._queues[name] = job_queue(name, consumer_timeout_ms=self.consumer_timeout_ms)
        return self._queues[name]

    def publish_pending(self) -> int:
        """One scheduling pass: publish what the scheduler picks for every family with waiting
        jobs, and stamp it, in one transaction; return how many were published (0 also when
        another replica holds the scheduling lock)."""
        config = self.schedule
        total = 0
        with self.sf() as session:
            if not scheduler.take_lock(session):
                return 0
            families = scheduler.waiting_families(session)
            if not families:  # the pass a freed slot or a job's end brings when nothing waits
                self.saturated = False
                return 0
            slots = scheduler.worker_slots(session, timeout=config.heartbeat_timeout)
            busy = scheduler.in_flight(session)
            started = time.perf_counter()
            try:
                for family in families:
                    budget = min(self.batch_size, config.budget(slots.get(family, 0), busy.get(family, 0)))
                    # Plain rows, not ORM objects: this runs many times a second inside the API.
                    rows = scheduler.lock_chosen(session, scheduler.choose(session, family, budget))
                    if not rows:
                        continue
                    confirmed = set(self._publish(rows))
                    # Stamped before the next family is chosen: its tenants' limits see them.
                    scheduler.stamp(session, family, [row for row in rows if row.id in confirmed])
                    total += len(confirmed)
            except Exception:
                self._reset()
                raise
            if total:
                BATCH_SECONDS.observe(time.perf_counter() - started)
                PUBLISHED.inc(total)
            session.commit()
        self.published += total
        # Jobs wait and none could go: only a slot freeing changes that, not another submit.
        self.saturated = bool(families) and not total
        return total

    def update_positions(self) -> int:
        """Place the queued jobs (``queue_position`` and ETA, with a ``job.queued`` event when a
        place changes materially) and drop messages nobody needs; return how many moved."""
        with self.sf() as session:
            if not scheduler.take_lock(session):
                return 0
            scheduler.drop_stale(session)
            moved = positions.update_all(session, self.schedule)
            session.commit()
        return moved

    def _send(self, row: Any, producer: Any) -> None:
        self.app.send_task(
            RUN_JOB,
            args=[row.job_id],
            task_id=row.job_id,
            queue=self._queue(row.queue),
            producer=producer,
            retry=False,
        )

    def _publish(self, rows: list[Any]) -> list[int]:
        """Publish ``rows``; return the ids the broker confirmed."""
        if not self.app.conf.broker_url.startswith(("amqp", "pyamqp")):
            # The in-process broker of `up` has no confirms: a publish that returned is delivered.
            with self.app.producer_or_acquire() as producer:
                for row in rows:
                    self._send(row, producer)
            return [row.id for row in rows]
        if self._channel is None:
            connection = Connection(self.app.conf.broker_url, heartbeat=0, connect_timeout=5)
            self._channel = ConfirmingChannel(connection)
            self._declared = set()
        confirmed = self._channel.publish_all(rows, self._send_direct)
        return [row.id for row in confirmed]

    def _send_direct(self, row: Any) -> None:
        """Celery's own task message (protocol 2), published straight on the confirm channel: the
        kombu producer path costs more than twice as much per message, on the API's CPU."""
        assert self._channel is not None
        channel = self._channel.channel
        queue = self._queue(row.queue)
        if row.queue not in self._declared:
            if not self._declared:
                DEAD_QUEUE.bind(channel).declare()  # where the family queues dead-letter to
            queue.bind(channel).declare()  # type: ignore[attr-defined]
            self._declared.add(row.queue)
        headers, properties, body, _ = self.app.amqp.as_task_v2(row.job_id, RUN_JOB, args=[row.job_id])
        message = channel.prepare_message(
            json.dumps(body),
            content_type="application/json",
            content_encoding="utf-8",
            headers=headers,
            properties={**properties, "delivery_mode": 2},
        )
        channel.basic_publish(message, exchange=queue.exchange.name, routing_key=queue.routing_key)  # type: ignore[attr-defined]

    def _reset(self) -> None:
        """Drop the broker connection after an error; the next batch opens a new one."""
        if self._channel is not None:
            with contextlib.suppress(Exception):
                self._channel.connection.release()
        self._channel = None

    def run(self, stop: threading.Event) -> None:
        """Schedule until ``stop`` is set; back off while the broker or database is down."""
        listener = self._slot_listener()
        try:
            self._loop(stop)
        finally:
            if listener is not None:
                listener.stop()

    def _slot_listener(self) -> SlotListener | None:
        engine = self.sf.kw.get("bind")
        if engine is None or engine.dialect.name != "postgresql":
            return None
        # Both: a relay that published in its last pass waits on ``wake`` (a submit may be
        # publishable), and a freed slot is as good a reason to pass as a submit.
        return SlotListener(engine, self.freed, self.wake).start()

    def _loop(self, stop: threading.Event) -> None:
        backoff = self.interval
        while not stop.is_set():
            began = time.monotonic()
            self.freed.clear()  # a slot freeing from here on is seen by this pass or wakes the next
            try:
                published = self.publish_pending()
                if began - self._placed >= self.position_interval:
                    self._placed = began
                    self.update_positions()
                backoff = self.interval
            except Exception as exc:
                FAILURES.inc()
                log.warning("outbox relay: %s; retrying in %.1fs", exc, backoff)
                stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            if published >= self.batch_size:
                continue
            # Woken by a submit or a slot freeing, or every interval. While every waiting family is
            # out of slots, a submit cannot be published either (a burst of them then costs one
            # pass per interval, not one per linger): only a slot that frees wakes the relay early.
            if self.saturated:
                self.freed.wait(self.interval)
            else:
                self.wake.wait(self.interval)
            self.wake.clear()
            # At most one pass per linger while jobs wait: during a burst every submit wakes the
            # relay, and a pass reads each waiting family's queue. A job arriving at an idle relay
            # (its last pass had nothing to publish, as after a job's end woke it) goes out at once;
            # with nothing waiting, a pass is one short query.
            rest = self.linger - (time.monotonic() - began)
            if rest > 0 and (published or self.saturated):
                stop.wait(rest)

    def start(self, stop: threading.Event) -> threading.Thread:
        thread = threading.Thread(target=self.run, args=(stop,), name="outbox-relay", daemon=True)
        thread.start()
        return thread
