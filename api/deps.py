"""FastAPI dependencies: the app's state (built once in ``create_app``), a session per request, the
authenticated tenant."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends, Request
from sqlalchemy.orm import Session, sessionmaker

from api.auth import KeyCache, authenticate
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
    broker: Any = None  # workers.broker.BrokerProbe
    metrics: Any = None  # api.metrics.ApiMetrics


def state(request: Request) -> AppState:
    return request.app.state.inference


def get_settings_dep(st: AppState = Depends(state)) -> Settings:
    return st.settings


def get_session(st: AppState = Depends(state)) -> Iterator[Session]:
    with st.session_factory() as session:
        yield session


def current_tenant(
    request: Request, session: Session = Depends(get_session), st: AppState = Depends(state)
) -> Tenant:
    tenant = authenticate(session, request.headers.get("authorization"), st.keys)
    if st.limiter is not None:
        st.limiter.check(tenant.id)
    return tenant
