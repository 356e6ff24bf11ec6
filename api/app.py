"""The API application factory."""

from __future__ import annotations

import threading
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api.deps import AppState
from api.docs import install_docs
from api.edge import LimitsAndTiming
from api.errors import install_error_handlers
from api.feed import EventFeed
from api.metrics import ApiMetrics, JobsCollector
from api.ratelimit import RateLimiter
from api.waiter import JobWaiter
from inference_server.db import DatabaseTimeouts, make_database, make_session_factory
from inference_server.jobs.service import JobContext
from inference_server.registry import Registry, load_registry
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
        settings, registry, open_storage(settings), on_published=relay.wake.set if relay else None
    )
    metrics = ApiMetrics()
    metrics.registry.register(JobsCollector(sf))
    from webhooks.service import DeliveryBacklogCollector

    metrics.registry.register(DeliveryBacklogCollector(sf))
    waiter = JobWaiter(db)
    # One LISTEN connection per process: the feed hears job ends for the waiter too.
    poll = settings.events_poll_interval
    feed = EventFeed(db, poll_interval=poll, on_finished=waiter.announce, on_reconnect=waiter.wake_all)
    app_state = AppState(
        settings=settings,
        session_factory=sf,
        ctx=ctx,
        broker=broker,
        metrics=metrics,
        waiter=waiter,
        feed=feed,
        limiter=RateLimiter(settings.rate_limit_per_minute) if settings.rate_limit_per_minute else None,
        auth_failures=RateLimiter(settings.auth_failures_per_minute)
        if settings.auth_failures_per_minute
        else None,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # type: ignore[no-untyped-def]
        if relay is not None:
            relay.start(stop)
        await feed.start()
        yield
        stop.set()
        await feed.stop()
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

    app.add_middleware(LimitsAndTiming, max_bytes=settings.max_request_bytes, metrics=metrics)

    from api.routes import events, jobs, previews, system, uploads, webhooks

    for module in (jobs, events, previews, system, uploads, webhooks):
        app.include_router(module.router)
    return app
