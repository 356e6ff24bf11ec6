"""API keys: random tokens, stored as SHA-256, looked up in O(1) and cached briefly per process."""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from inference_server.db import ApiKey, Tenant
from inference_server.errors import Unauthorized

KEY_PREFIX = "isk_"


@dataclass(frozen=True)
class Caller:
    """Who sent a request: the key's tenant and whether the key has the admin scope."""

    tenant: Tenant
    admin: bool = False


def new_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyCache:
    """key hash -> the key's caller (its tenant as a detached, read-only row, and its scope) for
    ``ttl`` seconds, so a request spends no database round trip on auth. A revoked key stops
    working within ``ttl``."""

    def __init__(self, ttl: float = 30.0, size: int = 10_000) -> None:
        self.ttl = ttl
        self.size = size
        self._items: dict[str, tuple[Caller, float]] = {}
        self._lock = threading.Lock()

    def get(self, digest: str) -> Caller | None:
        with self._lock:
            item = self._items.get(digest)
            if item and item[1] > time.monotonic():
                return item[0]
            return None

    def put(self, digest: str, caller: Caller) -> None:
        with self._lock:
            if len(self._items) >= self.size:
                self._items.clear()
            self._items[digest] = (caller, time.monotonic() + self.ttl)


def authenticate(session: Session, header: str | None, cache: KeyCache) -> Caller:
    if not header or not header.lower().startswith("bearer "):
        raise Unauthorized("missing API key: send `Authorization: Bearer <key>`", code="missing_api_key")
    digest = hash_key(header[7:].strip())
    cached = cache.get(digest)
    if cached is not None:
        return cached
    key = session.scalar(select(ApiKey).where(ApiKey.key_hash == digest, ApiKey.revoked_at.is_(None)))
    if key is None:
        raise Unauthorized("invalid API key", code="invalid_api_key")
    tenant = key.tenant
    session.expunge(tenant)  # detached: shared read-only by the requests of the next ttl seconds
    caller = Caller(tenant, admin=bool(key.admin))
    cache.put(digest, caller)
    return caller


def create_tenant_key(session: Session, tenant_name: str, *, admin: bool = False) -> tuple[Tenant, str]:
    """Create the tenant if needed and a new API key for it; returns the key in clear (shown once).
    ``admin``: the key may manage shared runtime models and LoRAs (and other operator routes)."""
    from webhooks.service import new_secret

    tenant = session.scalar(select(Tenant).where(Tenant.name == tenant_name))
    if tenant is None:
        tenant = Tenant(name=tenant_name, webhook_secret=new_secret())
        session.add(tenant)
        session.flush()
    key = new_api_key()
    session.add(ApiKey(tenant_id=tenant.id, key_hash=hash_key(key), prefix=key[:12], admin=admin))
    session.commit()
    return tenant, key
