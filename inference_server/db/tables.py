"""The core tables: tenants and their keys, jobs, outputs, events and the publish outbox.

Webhook deliveries live in ``webhooks/tables.py`` on the same metadata."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    ForeignKey,
    Index,
    Integer,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from inference_server.db.base import Base, JSONType, new_id, utcnow

# SQLite only auto-increments INTEGER PRIMARY KEY; PostgreSQL gets a BIGINT identity.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    webhook_secret: Mapped[str] = mapped_column(String(200))
    # While a secret rotates, deliveries are signed with both until this time.
    previous_webhook_secret: Mapped[str | None] = mapped_column(String(200))
    previous_secret_expires_at: Mapped[datetime | None]
    default_webhook_url: Mapped[str | None] = mapped_column(Text)
    default_webhook_events: Mapped[list[str] | None] = mapped_column(JSONType)
    # Limits (None: the API's settings; see inference_server/tenancy/). 0 means no limit, except for
    # output_retention_days, where 0 keeps outputs forever whatever OUTPUT_RETENTION_DAYS says.
    rate_limit_per_minute: Mapped[int | None]
    monthly_image_quota: Mapped[int | None]
    output_retention_days: Mapped[float | None]
    # The shape of deliveries to the default webhook and of jobs naming none (None: standard), and
    # the static bearer token `split` deliveries carry (docs/webhooks: profiles).
    default_webhook_profile: Mapped[str | None] = mapped_column(String(16))
    webhook_token: Mapped[str | None] = mapped_column(String(500))
    # Scheduling limits (inference_server/publish/scheduler.py): the highest priority its jobs may
    # ask for (None: normal) and how many may run (or be on their way to a worker) at once.
    max_priority: Mapped[str | None] = mapped_column(String(8))
    max_concurrent: Mapped[int | None]
    # Composition: the safety of jobs that name none (off | flag | block; None: SAFETY_DEFAULT),
    # and words a prompt may not hold (whole words, any case).
    safety: Mapped[str | None] = mapped_column(String(8))
    deny_words: Mapped[list[str] | None] = mapped_column(JSONType)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    # SHA-256 of the key: keys are long random tokens, so a fast hash is enough and lookups stay O(1).
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    # An admin key manages what every tenant shares (runtime models and LoRAs).
    admin: Mapped[bool] = mapped_column(default=False, server_default=false())
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]

    tenant: Mapped[Tenant] = relationship(lazy="joined")


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key", name="uq_jobs_tenant_idempotency"),
        Index("ix_jobs_tenant_created", "tenant_id", "created_at", "id"),
        Index("ix_jobs_status", "status"),
        Index("ix_jobs_status_lease", "status", "lease_expires_at"),
        Index("ix_jobs_family_status", "family", "status", "finished_at"),
        Index("ix_jobs_batch_key", "batch_key", "status", "created_at"),
        # Output retention walks succeeded jobs not yet expired in the order they finished.
        Index("ix_jobs_output_expiry", "status", "outputs_expired_at", "finished_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(String(16), default="queued")
    family: Mapped[str] = mapped_column(String(64))
    model: Mapped[str | None] = mapped_column(String(200))
    task: Mapped[str] = mapped_column(String(32))
    params: Mapped[dict[str, Any]] = mapped_column(JSONType)
    webhook_url: Mapped[str | None] = mapped_column(Text)
    webhook_events: Mapped[list[str] | None] = mapped_column(JSONType)
    webhook_profile: Mapped[str | None] = mapped_column(String(16))  # None: the tenant's default
    # A job submitted over AMQP with ``reply_to``: its events are also published to that queue.
    reply_to: Mapped[str | None] = mapped_column(String(255))
    correlation_id: Mapped[str | None] = mapped_column(String(255))
    reply_events: Mapped[list[str] | None] = mapped_column(JSONType)  # None: every event
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    progress_step: Mapped[int] = mapped_column(default=0)
    progress_total: Mapped[int] = mapped_column(default=0)
    eta_seconds: Mapped[float | None]
    # 2 high, 1 normal, 0 low (jobs.enums.Priority): the scheduler runs higher numbers first.
    priority: Mapped[int] = mapped_column(SmallInteger, default=1, server_default="1")
    # While queued: jobs of its family that will start before it, as the scheduler last placed it.
    queue_position: Mapped[int | None]
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(default=0)
    # The running attempt's lease, renewed by its worker; the reconciler re-queues the job once it
    # expires (the worker died, hung, or lost the database). ``worker`` names the lease holder.
    lease_expires_at: Mapped[datetime | None]
    worker: Mapped[str | None] = mapped_column(String(200))
    # Cross-request batching (jobs.batch_key): what compatible queued jobs share, and the pipeline
    # call this job's attempt ran in (null: alone).
    batch_key: Mapped[str | None] = mapped_column(String(64))
    batch_id: Mapped[str | None] = mapped_column(String(36))
    batch_size: Mapped[int | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    # When retention deleted the job's outputs (their rows go with the files; the job stays).
    outputs_expired_at: Mapped[datetime | None]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    outputs: Mapped[list[JobOutput]] = relationship(
        order_by="JobOutput.index", lazy="selectin", cascade="all, delete-orphan"
    )


class JobOutput(Base):
    __tablename__ = "job_outputs"
    __table_args__ = (UniqueConstraint("job_id", "index", name="uq_job_outputs_job_index"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    index: Mapped[int]
    # image: a generated image; control: a ControlNet's image after preprocessing; mask: the mask
    # inpainted (given or found from words). Asked for with return_control / return_mask.
    kind: Mapped[str] = mapped_column(String(16), default="image", server_default="image")
    # None for a blocked output (nothing stored) and, for the seed, for control images and masks.
    uri: Mapped[str | None] = mapped_column(Text)
    content_type: Mapped[str | None] = mapped_column(String(64))
    width: Mapped[int]
    height: Mapped[int]
    seed: Mapped[int | None] = mapped_column(BigInteger)
    sha256: Mapped[str | None] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    # The safety checker's verdict (None: not checked) and whether `safety: block` withheld it.
    nsfw: Mapped[bool | None]
    nsfw_score: Mapped[float | None]
    blocked: Mapped[bool] = mapped_column(default=False, server_default=false())


class JobEvent(Base):
    """An event in a job's life. ``seq`` orders a job's events; ``id`` is the stable webhook-id."""

    __tablename__ = "job_events"
    __table_args__ = (
        Index("ix_job_events_job_seq", "job_id", "seq"),
        Index("ix_job_events_pending_fanout", "fanned_out", "seq"),
    )

    seq: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    type: Mapped[str] = mapped_column(String(32))
    # The webhook body, frozen when the event happened: {type, timestamp, data: <job>}.
    payload: Mapped[dict[str, Any]] = mapped_column(JSONType)
    # Set once the dispatcher has turned the event into deliveries.
    fanned_out: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class OutboxMessage(Base):
    """A queue message committed with its job; the relay publishes it and stamps ``published_at``."""

    __tablename__ = "outbox"
    __table_args__ = (Index("ix_outbox_unpublished", "published_at", "id"), Index("ix_outbox_job", "job_id"))

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    queue: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    published_at: Mapped[datetime | None]
    publish_attempts: Mapped[int] = mapped_column(default=0)
    available_at: Mapped[datetime | None]  # not published before then (a retry's backoff)


class WorkerHeartbeat(Base):
    """A worker as it last reported itself (workers/heartbeat.py), every few seconds: the scheduler
    counts the free slots of the families it serves, ``GET /v1/models`` shows it."""

    __tablename__ = "worker_heartbeats"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    families: Mapped[list[str]] = mapped_column(JSONType)
    queues: Mapped[list[str]] = mapped_column(JSONType)
    slots: Mapped[int]  # jobs it runs at once
    busy: Mapped[int]  # jobs it runs now
    device: Mapped[str] = mapped_column(String(32))
    gpu_memory_total: Mapped[int | None] = mapped_column(BigInteger)  # bytes; None on a CPU
    gpu_memory_free: Mapped[int | None] = mapped_column(BigInteger)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen: Mapped[datetime] = mapped_column(default=utcnow)


class SchedulerTurn(Base):
    """When the scheduler last handed out a job of a tenant in a family: among tenants in the same
    fair-share round, the one served longest ago goes first (publish.scheduler)."""

    __tablename__ = "scheduler_turns"

    family: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)
    served_at: Mapped[datetime]


class DeletedJob(Base):
    """The tombstone of a job deleted through ``DELETE /v1/jobs/{id}``: its rows are gone, this says
    it existed, whose it was, and keeps its id from being taken again."""

    __tablename__ = "deleted_jobs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    deleted_at: Mapped[datetime] = mapped_column(default=utcnow)


class TenantUsage(Base):
    """Images a tenant submitted in a calendar month (UTC), counted at submit: the monthly quota
    compares against it, and deleting jobs does not give the images back. The month's count is the
    sum of its shards (tenancy/usage.py: a tenant without a quota adds to a shard chosen at random,
    so its concurrent submits do not queue behind one row's lock)."""

    __tablename__ = "tenant_usage"

    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)
    month: Mapped[str] = mapped_column(String(7), primary_key=True)  # "2026-12"
    shard: Mapped[int] = mapped_column(SmallInteger, primary_key=True, default=0, server_default="0")
    images: Mapped[int] = mapped_column(BigInteger, default=0)
