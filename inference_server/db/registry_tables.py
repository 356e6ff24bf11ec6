"""The runtime registry's tables: models and LoRAs added through the API, the version counter
workers poll, and warm placement (requests, workers' answers, what each worker holds loaded).

The registry file (``MODELS_FILE``) stays the seed; these rows are added to it. An owner of None
is a shared entry, managed by admin keys; otherwise only the owning tenant sees it."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Float, ForeignKey, Index, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from inference_server.db.base import Base, JSONType, new_id, utcnow
from inference_server.db.tables import BigId


class RuntimeModel(Base):
    __tablename__ = "runtime_models"
    __table_args__ = (UniqueConstraint("family", "model_id", name="uq_runtime_models_family_model"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    family: Mapped[str] = mapped_column(String(64))
    model_id: Mapped[str] = mapped_column(String(200))
    source: Mapped[str] = mapped_column(Text)
    dtype: Mapped[str] = mapped_column(String(16), default="float32")
    df11: Mapped[str | None] = mapped_column(Text)
    defaults: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    limits: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    owner_tenant_id: Mapped[str | None] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class RuntimeLora(Base):
    __tablename__ = "runtime_loras"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    # One name space for every family: ``GET /v1/loras/{name}`` names no family.
    name: Mapped[str] = mapped_column(String(200), unique=True)
    family: Mapped[str] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(Text)
    weight_name: Mapped[str | None] = mapped_column(String(200))
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    owner_tenant_id: Mapped[str | None] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class RegistryVersion(Base):
    """One row; bumped by every change to the runtime registry and every placement request, so a
    worker's poll is one primary-key read."""

    __tablename__ = "registry_version"

    id: Mapped[int] = mapped_column(primary_key=True)
    version: Mapped[int] = mapped_column(BigInteger, default=0)


class PlacementRequest(Base):
    """An ask to the workers of ``family`` to load or unload a model, between their jobs."""

    __tablename__ = "placement_requests"
    __table_args__ = (Index("ix_placement_requests_family_id", "family", "id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    family: Mapped[str] = mapped_column(String(64))
    model_id: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(8))  # load | unload
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class PlacementAnswer(Base):
    """One worker's answer to a placement request."""

    __tablename__ = "placement_answers"
    __table_args__ = (UniqueConstraint("request_id", "worker", name="uq_placement_answers_request_worker"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    request_id: Mapped[int] = mapped_column(ForeignKey("placement_requests.id", ondelete="CASCADE"))
    worker: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16))  # loaded | unloaded | failed
    seconds: Mapped[float] = mapped_column(Float, default=0.0)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class WorkerModel(Base):
    """A model a worker holds in its pipeline cache now (written by the worker as it loads and evicts)."""

    __tablename__ = "worker_models"
    __table_args__ = (UniqueConstraint("worker", "family", "model_id", name="uq_worker_models_worker_model"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    worker: Mapped[str] = mapped_column(String(200))
    family: Mapped[str] = mapped_column(String(64))
    model_id: Mapped[str] = mapped_column(String(200))
    loaded_at: Mapped[datetime] = mapped_column(default=utcnow)
