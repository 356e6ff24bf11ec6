"""The API application factory."""

from __future__ import annotations

import threading
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from api.access_log import AccessLog
from api.auth import KeyCache
from api.deps import AppState
from api.docs import install_docs
from api.edge import LimitsAndTiming
from api.errors import install_error_handlers
from api.feed import EventFeed
from api.metrics import ApiMetrics, JobsCollector, RegistryCollector
from api.ratelimit import LimitStore, RateLimiter
from api.registry_watch import RegistryWatch
from api.waiter import JobWaiter
from inference_server.db import DatabaseTimeouts, make_database, make_session_factory
from inference_server.jobs.service import JobContext
from inference_server.registry import Registry
from inference_server.registry.runtime import RuntimeRegistry
from inference_server.settings import Settings
from inference_server.storage import open_storage


def create_app(settings: Settings, *, run_relay: bool = True, registry: Registry | None = None) -> FastAPI:
    """Build the API. ``run_relay`` starts the outbox relay thread in this process (the default)."""
    # A request must not wait on a silent database longer than its statements may take.
    api_limit = settings.api_statement_timeout
    connect = min(settings.database_connect_timeout, api_limit) if api_limit else None
    timeouts = DatabaseTimeouts.from_settings(settings, statement=api_limit, connect=connect)
    db = make_database(settings.database_url, pool_size=20, pre_ping=False, timeouts=timeouts)
    sf = make_session_factory(db)
    watch = None
    if registry is None and settings.models_file:
        watch = RegistryWatch(settings.models_file)  # a missing file: started, not ready (/readyz)
        registry = watch.registry
    elif registry is None:
        registry = Registry(None, {})
    stop = threading.Event()
    relay = None
    from inference_server.publish.probe import BrokerProbe

    broker = BrokerProbe(settings.broker_url)
    if run_relay:
        from inference_server.publish.relay import Relay

        relay = Relay.from_settings(sf, settings)
    ctx = JobContext(
        settings,
        registry,
        open_storage(settings),
        on_published=relay.wake.set if relay else None,
        runtime=RuntimeRegistry(registry, poll=settings.registry_poll_interval),
    )
    metrics = ApiMetrics()
    metrics.registry.register(JobsCollector(sf, registry.families))
    metrics.registry.register(RegistryCollector(registry.families))
    if relay is not None:
        from inference_server.publish import metrics as relay_metrics

        relay_metrics.register(metrics.registry)
    from webhooks.service import DeliveryBacklogCollector

    metrics.registry.register(DeliveryBacklogCollector(sf))
    waiter = JobWaiter(db)
    # One LISTEN connection per process: the feed hears job ends for the waiter too.
    poll = settings.events_poll_interval
    feed = EventFeed(db, poll_interval=poll, on_finished=waiter.announce, on_reconnect=waiter.wake_all)
    limits = LimitStore(
        settings.rate_limit_storage_url, key_prefix=settings.rate_limit_key_prefix, metrics=metrics.registry
    )
    app_state = AppState(
        settings=settings,
        session_factory=sf,
        ctx=ctx,
        broker=broker,
        metrics=metrics,
        waiter=waiter,
        feed=feed,
        # In /readyz only for an API that started without its file (api/registry_watch.py).
        registry_watch=watch if watch is not None and not watch.loaded else None,
        keys=KeyCache(ttl=settings.api_key_cache_seconds),
        # Always there: a tenant may have a rate of its own with RATE_LIMIT_PER_MINUTE at 0.
        limiter=RateLimiter(settings.rate_limit_per_minute, limits, name="key"),
        auth_failures=RateLimiter(settings.auth_failures_per_minute, limits, name="auth-failures")
        if settings.auth_failures_per_minute
        else None,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # type: ignore[no-untyped-def]
        if relay is not None:
            relay.start(stop)
        await feed.start()
        metrics_server = serve_metrics(settings, metrics.registry)
        from inference_server.publish.broker_version import check_in_background

        check_in_background(settings.broker_url, settings.consumer_timeout_ms)
        yield
        stop.set()
        await feed.stop()
        if metrics_server is not None:
            metrics_server.shutdown()
            metrics_server.server_close()
        db.dispose()

    app = FastAPI(
        title="inference-server",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,  # api.docs serves it without a CDN
        openapi_url=None,  # api.docs serves it, behind a key when DOCS_REQUIRE_KEY says so
        redoc_url=None,  # ReDoc, too, would load from a CDN
        swagger_ui_oauth2_redirect_url=None,
        # Operation ids are the route functions' names (submit_job, get_job): what generated
        # clients call their methods. A duplicate name fails the OpenAPI validation test.
        generate_unique_id_function=lambda route: route.name,
    )
    app.state.inference = app_state
    app.state.relay = relay
    install_error_handlers(app)
    install_docs(app, require_key=bool(settings.docs_require_key))

    app.add_middleware(
        LimitsAndTiming,
        max_bytes=settings.max_request_bytes,
        metrics=metrics,
        # A LoRA upload is one file, often larger than any job request.
        path_limits={"/v1/loras": settings.max_lora_bytes + 64 * 1024},
    )
    app.add_middleware(AccessLog)  # added last: outermost, so it sees the edge's refusals too

    from api.routes import events, jobs, models, previews, system, tenants, uploads, webhooks

    for module in (jobs, events, previews, models, system, tenants, uploads, webhooks):
        app.include_router(module.router)
    return app


def serve_metrics(settings: Settings, registry: CollectorRegistry) -> Any:
    """With ``API_METRICS_PORT``, /metrics on a listener of its own (returned, to be shut down);
    the API's own port then answers it 404, so metrics need not be reachable where clients are."""
    if not settings.api_metrics_port:
        return None
    from prometheus_client import start_http_server

    server, _ = start_http_server(settings.api_metrics_port, settings.api_metrics_host, registry=registry)
    return server
