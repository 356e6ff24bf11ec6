"""The ingress's composition root: `inference-server ingress` consumes the AMQP request queue and
writes jobs through the job service, with an outbox relay (``INGRESS_RELAY``) so its jobs are
published at once, and a side port for metrics and probes (``INGRESS_METRICS_PORT``). Any number
of replicas may run: each takes its own messages, and ``message_id`` keeps a redelivery to one job."""

from __future__ import annotations

import logging
import signal
import threading

from inference_server.settings import Settings

log = logging.getLogger(__name__)


def run_ingress(settings: Settings) -> None:
    """Run until SIGINT or SIGTERM; the batch in hand is finished and acknowledged first."""
    from inference_server.db import DatabaseTimeouts, make_database, make_session_factory
    from inference_server.ingress.consumer import Ingress
    from inference_server.ingress.health import Health, serve
    from inference_server.jobs.service import JobContext
    from inference_server.registry import Registry, load_registry
    from inference_server.registry.runtime import RuntimeRegistry
    from inference_server.storage import open_storage

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    database = make_database(
        settings.database_url, pool_size=4, timeouts=DatabaseTimeouts.from_settings(settings)
    )
    sf = make_session_factory(database)
    registry = load_registry(settings.models_file) if settings.models_file else Registry(None, {})
    relay = None
    if settings.ingress_relay:
        from inference_server.publish.relay import Relay

        relay = Relay.from_settings(sf, settings)
        relay.start(stop)
    # The runtime registry too: a model or LoRA added through the API is usable over AMQP at once.
    ctx = JobContext(
        settings,
        registry,
        open_storage(settings),
        on_published=relay.wake.set if relay else None,
        runtime=RuntimeRegistry(registry, poll=settings.registry_poll_interval),
    )
    health = Health()
    if settings.ingress_metrics_port:
        serve(settings.ingress_metrics_port, health)
    Ingress(settings, sf, ctx, health).run(stop)
    log.info("ingress stopped")
    database.dispose()
