"""The API application factory."""

from __future__ import annotations

import threading
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api.auth import KeyCache
from api.deps import AppState
from api.docs import install_docs
from api.edge import LimitsAndTiming
from api.errors import install_error_handlers
from api.metrics import ApiMetrics, JobsCollector
from api.ratelimit import RateLimiter
from api.waiter import JobWaiter
from inference_server.db import DatabaseTimeouts, make_database, make_session_factory
from inference_server.jobs.service import JobContext
from inference_server.registry import Registry, load_registry
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
    if registry is None:
        registry = load_registry(settings.models_file) if settings.models_file else Registry(None, {})
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
    metrics.registry.register(JobsCollector(sf))
    from webhooks.service import DeliveryBacklogCollector

    metrics.registry.register(DeliveryBacklogCollector(sf))
    waiter = JobWaiter(db)
    app_state = AppState(
        settings=settings,
        session_factory=sf,
        ctx=ctx,
        broker=broker,
        metrics=metrics,
        waiter=waiter,
        keys=KeyCache(ttl=settings.api_key_cache_seconds),
        # Always there: a tenant may have a rate of its own with RATE_LIMIT_PER_MINUTE at 0.
        limiter=RateLimiter(settings.rate_limit_per_minute),
        auth_failures=RateLimiter(settings.auth_failures_per_minute)
        if settings.auth_failures_per_minute
        else None,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # type: ignore[no-untyped-def]
        if relay is not None:
            relay.start(stop)
        waiter.start()
        yield
        stop.set()
        waiter.stop()
        db.dispose()

    app = FastAPI(
        title="inference-server",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,  # api.docs serves it without a CDN
        redoc_url=None,  # ReDoc, too, would load from a CDN
        swagger_ui_oauth2_redirect_url=None,
    )
    app.state.inference = app_state
    app.state.relay = relay
    install_error_handlers(app)
    install_docs(app)

    app.add_middleware(
        LimitsAndTiming,
        max_bytes=settings.max_request_bytes,
        metrics=metrics,
        # A LoRA upload is one file, often larger than any job request.
        path_limits={"/v1/loras": settings.max_lora_bytes + 64 * 1024},
    )

    from api.routes import jobs, models, system, tenants, uploads, webhooks

    for module in (jobs, models, system, tenants, uploads, webhooks):
        app.include_router(module.router)
    return app
