"""The API application factory."""

from __future__ import annotations

import threading
import time
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from api.deps import AppState
from api.errors import error_body, install_error_handlers
from api.metrics import ApiMetrics, JobsCollector
from api.ratelimit import RateLimiter
from inference_server.db import make_engine, make_session_factory
from inference_server.engine.registry import Registry, load_registry
from inference_server.jobs.service import JobContext
from inference_server.settings import Settings
from inference_server.storage import open_storage


def create_app(settings: Settings, *, run_relay: bool = True, registry: Registry | None = None) -> FastAPI:
    """Build the API. ``run_relay`` starts the outbox relay thread in this process (the default)."""
    db = make_engine(settings.database_url, pool_size=20)
    sf = make_session_factory(db)
    if registry is None:
        registry = load_registry(settings.models_file) if settings.models_file else Registry(None, {})
    stop = threading.Event()
    relay = None
    from workers.broker import BrokerProbe

    broker = BrokerProbe(settings.broker_url)
    if run_relay:
        from workers.celery_app import create_celery_app
        from workers.relay import Relay

        relay = Relay(
            create_celery_app(settings), sf, batch_size=settings.relay_batch_size,
            interval=settings.relay_interval, consumer_timeout_ms=settings.consumer_timeout_ms,
        )
    ctx = JobContext(settings, registry, open_storage(settings), on_published=relay.wake.set if relay else None)
    metrics = ApiMetrics()
    metrics.registry.register(JobsCollector(sf))
    app_state = AppState(
        settings=settings, session_factory=sf, ctx=ctx, broker=broker, metrics=metrics,
        limiter=RateLimiter(settings.rate_limit_per_minute) if settings.rate_limit_per_minute else None,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # type: ignore[no-untyped-def]
        if relay is not None:
            relay.start(stop)
        yield
        stop.set()
        db.dispose()

    app = FastAPI(title="inference-server", version="0.1.0", lifespan=lifespan)
    app.state.inference = app_state
    app.state.relay = relay
    install_error_handlers(app)

    @app.middleware("http")
    async def limits_and_timing(request: Request, call_next: Any) -> Any:
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > settings.max_request_bytes:
            return JSONResponse(
                error_body("request_too_large", f"requests are limited to {settings.max_request_bytes} bytes"),
                status_code=413,
            )
        start = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        metrics.requests.labels(
            request.method, getattr(route, "path", "unmatched"), str(response.status_code)
        ).observe(time.perf_counter() - start)
        return response

    from api.routes import jobs, system, uploads, webhooks

    for module in (jobs, system, uploads, webhooks):
        app.include_router(module.router)
    return app
