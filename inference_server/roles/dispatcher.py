"""The dispatcher's composition root: webhook delivery and an outbox relay as threads, on one
database pool. `inference-server dispatcher` runs them until stopped; `up` starts the delivery
part next to its API, whose own relay publishes."""

from __future__ import annotations

import logging
import signal
import threading

from inference_server.settings import Settings

log = logging.getLogger(__name__)


def start_dispatcher(
    settings: Settings, stop: threading.Event, *, relay: bool = True
) -> list[threading.Thread]:
    """Start webhook delivery, the reconciler and (unless the process already has one) an outbox
    relay, as threads that run until ``stop`` is set."""
    from inference_server.db import DatabaseTimeouts, make_database, make_session_factory
    from inference_server.jobs.reconcile import Reconciler
    from inference_server.publish.probe import BrokerProbe
    from inference_server.publish.relay import Relay
    from webhooks.dispatcher import Dispatcher

    database = make_database(
        settings.database_url,
        pool_size=settings.webhook_concurrency + 4,
        timeouts=DatabaseTimeouts.from_settings(settings),
    )
    sf = make_session_factory(database)
    threads = []
    relayer = Relay.from_settings(sf, settings) if relay else None
    if relayer is not None:
        threads.append(relayer.start(stop))
    probe = BrokerProbe(settings.broker_url)
    wake = relayer.wake.set if relayer is not None else None
    threads.append(Reconciler(settings, sf, probe.ready, on_published=wake).start(stop))
    delivery = threading.Thread(
        target=Dispatcher(settings, sf).run, args=(stop,), name="dispatcher", daemon=True
    )
    delivery.start()
    threads.append(delivery)
    return threads


def run_dispatcher(settings: Settings) -> None:
    """`inference-server dispatcher`: serve its metrics, run until SIGINT or SIGTERM."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    if settings.dispatcher_metrics_port:
        from prometheus_client import start_http_server

        from inference_server.publish import metrics as relay_metrics

        # Delivery outcomes, the relay's publishes and the reconciler's passes are counted in this
        # process; Prometheus scrapes them here.
        from webhooks.metrics import DELIVERIES, OUTCOMES

        relay_metrics.register()
        for outcome in OUTCOMES:  # every outcome's series exists from the start: rate() sees the first
            DELIVERIES.labels(outcome=outcome)
        start_http_server(settings.dispatcher_metrics_port)
    threads = start_dispatcher(settings, stop)
    log.info("dispatcher running (relay, reconciler, webhook delivery)")
    while not stop.wait(1.0):
        pass
    for t in threads:
        t.join(timeout=20)
