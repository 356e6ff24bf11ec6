"""FastAPI dependencies: the app's state (built once in ``create_app``), a session per request, the
authenticated tenant."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool
from starlette.requests import HTTPConnection

from api.auth import KeyCache, authenticate, hash_key
from api.ratelimit import RateLimiter
from inference_server.db import Tenant
from inference_server.errors import Unauthorized
from inference_server.jobs.service import JobContext
from inference_server.settings import Settings


@dataclass
class AppState:
    settings: Settings
    session_factory: sessionmaker[Session]
    ctx: JobContext
    keys: KeyCache = field(default_factory=KeyCache)
    limiter: RateLimiter | None = None
    auth_failures: RateLimiter | None = None  # per client address
    broker: Any = None  # inference_server.publish.probe.BrokerProbe
    metrics: Any = None  # api.metrics.ApiMetrics
    waiter: Any = None  # api.waiter.JobWaiter
    feed: Any = None  # api.feed.EventFeed


async def state(request: Request) -> AppState:
    # async: FastAPI runs sync dependencies in its thread pool, a hop each; these need none.
    return request.app.state.inference


def get_session(st: AppState = Depends(state)) -> Iterator[Session]:
    with st.session_factory() as session:
        yield session


# Declares the bearer scheme in the OpenAPI document on every route that needs a key; the header is
# checked below (auto_error=False), so a missing key keeps this API's own code and message.
BEARER = HTTPBearer(auto_error=False, description="An API key: `inference-server keys create`.")


async def current_tenant(
    request: Request,
    st: AppState = Depends(state),
    _scheme: HTTPAuthorizationCredentials | None = Depends(BEARER),
) -> Tenant:
    """The caller's tenant: from the key cache without a thread hop, else looked up in the pool."""
    return await tenant_for(request, st, request.headers.get("authorization"))


async def tenant_for(conn: HTTPConnection, st: AppState, header: str | None) -> Tenant:
    """The tenant of ``header`` (``Bearer <key>``) for the request or WebSocket ``conn``, counted
    against the rate limits like any request's."""
    tenant = st.keys.get(hash_key(header[7:].strip())) if header and header[:7].lower() == "bearer " else None
    if tenant is None:
        tenant = await _authenticate_counting_failures(conn, st, header)
    if st.limiter is not None:
        st.limiter.check(tenant.id)
    return tenant


async def _authenticate_counting_failures(
    request: HTTPConnection, st: AppState, header: str | None
) -> Tenant:
    """Look the key up, unless the caller's address has failed too often lately: guessing keys costs
    a database round trip each, and a 429 from memory costs nothing."""
    if st.auth_failures is None or not header:
        return await run_in_threadpool(_authenticate, st, header)
    address = request.client.host if request.client else "unknown"
    st.auth_failures.check(address, spend=False)
    try:
        return await run_in_threadpool(_authenticate, st, header)
    except Unauthorized as exc:
        if exc.code == "invalid_api_key":  # a guess; a missing key guesses nothing
            st.auth_failures.check(address)
        raise


def _authenticate(st: AppState, header: str | None) -> Tenant:
    with st.session_factory() as session:
        return authenticate(session, header, st.keys)
