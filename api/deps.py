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

from api.auth import KeyCache, authenticate, hash_key
from api.ratelimit import RateLimiter
from inference_server.db import Tenant
from inference_server.jobs.service import JobContext
from inference_server.settings import Settings


@dataclass
class AppState:
    settings: Settings
    session_factory: sessionmaker[Session]
    ctx: JobContext
    keys: KeyCache = field(default_factory=KeyCache)
    limiter: RateLimiter | None = None
    broker: Any = None  # inference_server.publish.probe.BrokerProbe
    metrics: Any = None  # api.metrics.ApiMetrics
    waiter: Any = None  # api.waiter.JobWaiter


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
    header = request.headers.get("authorization")
    tenant = st.keys.get(hash_key(header[7:].strip())) if header and header[:7].lower() == "bearer " else None
    if tenant is None:
        tenant = await run_in_threadpool(_authenticate, st, header)
    if st.limiter is not None:
        st.limiter.check(tenant.id)
    return tenant


def _authenticate(st: AppState, header: str | None) -> Tenant:
    with st.session_factory() as session:
        return authenticate(session, header, st.keys)
