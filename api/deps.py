"""FastAPI dependencies: the app's state (built once in ``create_app``), a session per request, the
authenticated tenant."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool
from starlette.requests import HTTPConnection

from api.auth import Caller, KeyCache, authenticate, hash_key
from api.ratelimit import RateLimiter
from inference_server.db import Tenant
from inference_server.errors import Forbidden, Unauthorized
from inference_server.jobs.service import JobContext
from inference_server.settings import Settings
from inference_server.tenancy.limits import effective_rate


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
    registry_watch: Any = None  # api.registry_watch.RegistryWatch: MODELS_FILE may appear later


async def state(request: Request) -> AppState:
    # async: FastAPI runs sync dependencies in its thread pool, a hop each; these need none.
    return request.app.state.inference


def get_session(st: AppState = Depends(state)) -> Iterator[Session]:
    session = st.session_factory()
    try:
        yield session
    finally:
        try:
            session.close()
        except SQLAlchemyError:
            # The database went silent under the request, whose answer (a 503) may already be
            # out: closing must not raise into the server, which would drop the client's
            # connection. The pool discards the connection instead of returning it.
            session.invalidate()


# Declares the bearer scheme in the OpenAPI document on every route that needs a key; the header is
# checked below (auto_error=False), so a missing key keeps this API's own code and message.
BEARER = HTTPBearer(auto_error=False, description="An API key: `inference-server keys create`.")


async def current_caller(
    request: Request,
    st: AppState = Depends(state),
    _scheme: HTTPAuthorizationCredentials | None = Depends(BEARER),
) -> Caller:
    """The caller (tenant and scope): from the key cache without a thread hop, else looked up in the pool."""
    return await caller_for(request, st, request.headers.get("authorization"))


async def caller_for(conn: HTTPConnection, st: AppState, header: str | None) -> Caller:
    """The caller of ``header`` (``Bearer <key>``) for the request or WebSocket ``conn``, counted
    against the rate limits like any request's."""
    caller = st.keys.get(hash_key(header[7:].strip())) if header and header[:7].lower() == "bearer " else None
    if caller is None:
        caller = await _authenticate_counting_failures(conn, st, header)
    rate = effective_rate(caller.tenant, st.settings)
    if st.limiter is not None and rate:
        await st.limiter.check(caller.tenant.id, per_minute=rate)
    return caller


async def current_tenant(caller: Caller = Depends(current_caller)) -> Tenant:
    """The caller's tenant."""
    return caller.tenant


async def require_admin(caller: Caller = Depends(current_caller)) -> Caller:
    """The caller, if its key has the admin scope (`keys create --admin`); 403 ``admin_required`` if not.
    The one check of the operator scope: routes that need it depend on this."""
    if not caller.admin:
        raise Forbidden(
            "this needs an admin key (inference-server keys create --admin)", code="admin_required"
        )
    return caller


async def _authenticate_counting_failures(
    request: HTTPConnection, st: AppState, header: str | None
) -> Caller:
    """Look the key up, unless the caller's address has failed too often lately: guessing keys costs
    a database round trip each, and a 429 from the limiter costs none."""
    if st.auth_failures is None or not header:
        return await run_in_threadpool(_authenticate, st, header)
    address = request.client.host if request.client else "unknown"
    await st.auth_failures.check(address, spend=False)
    try:
        return await run_in_threadpool(_authenticate, st, header)
    except Unauthorized as exc:
        if exc.code == "invalid_api_key":  # a guess; a missing key guesses nothing
            await st.auth_failures.check(address)
        raise


def _authenticate(st: AppState, header: str | None) -> Caller:
    with st.session_factory() as session:
        return authenticate(session, header, st.keys)
