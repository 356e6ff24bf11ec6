"""Long-running roles started by the CLI (the dispatcher here; the API and workers elsewhere)."""

from __future__ import annotations

import logging
import signal
import threading

from inference_server.settings import Settings

log = logging.getLogger(__name__)


def start_dispatcher_threads(
    settings: Settings, stop: threading.Event, *, relay: bool = True
) -> list[threading.Thread]:
    """The webhook dispatcher and (unless the process already has one) an outbox relay, as threads."""
    from inference_server.db import DatabaseTimeouts, make_database, make_session_factory
    from inference_server.publish.relay import Relay
    from webhooks.dispatcher import Dispatcher

    database = make_database(
        settings.database_url,
        pool_size=settings.webhook_concurrency + 4,
        timeouts=DatabaseTimeouts.from_settings(settings),
    )
    sf = make_session_factory(database)
    threads = []
    if relay:
        relayer = Relay.from_settings(sf, settings)
        threads.append(relayer.start(stop))
    delivery = threading.Thread(
        target=Dispatcher(settings, sf).run, args=(stop,), name="dispatcher", daemon=True
    )
    delivery.start()
    threads.append(delivery)
    return threads


def run_dispatcher(settings: Settings) -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    if settings.dispatcher_metrics_port:
        from prometheus_client import start_http_server

        # Delivery outcomes are counted in this process; Prometheus scrapes them here.
        start_http_server(settings.dispatcher_metrics_port)
    threads = start_dispatcher_threads(settings, stop)
    log.info("dispatcher running (relay + webhook delivery)")
    while not stop.wait(1.0):
        pass
    for t in threads:
        t.join(timeout=20)
