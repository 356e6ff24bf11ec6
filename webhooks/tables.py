"""Webhook delivery tables on the shared metadata: one delivery per (event, destination), its attempts,
and the URLs that answered 410 Gone."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum, nonmember

from sqlalchemy import BigInteger, ForeignKey, Index, Integer, String, Text, UniqueConstraint, text
from sqlalchemy.orm import Mapped, mapped_column, relationship

from inference_server.db.base import Base, new_id, utcnow
from inference_server.db.tables import BigId
from inference_server.jobs.enums import DeliveryKind

__all__ = ["DeliveryKind", "DeliveryStatus", "WebhookAttempt", "WebhookDelivery", "WebhookGoneURL"]


class DeliveryStatus(StrEnum):
    """Delivery states (stored as their values). Only PENDING and SENDING are active."""

    # Behind the chain's cursor (an earlier delivery of the same job and URL). next_attempt_at is NULL
    # until a failure before it releases it for a round (webhooks/chain.py).
    WAITING = "waiting"
    PENDING = "pending"  # due at next_attempt_at (first attempt, or a retry after a failure)
    SENDING = "sending"  # claimed by a dispatcher; next_attempt_at is the claim's lease expiry
    SUCCEEDED = "succeeded"
    EXHAUSTED = "exhausted"  # every attempt failed (or the URL was refused); replayable
    GONE = "gone"  # the receiver answered 410: nothing more goes to that URL
    SUPERSEDED = "superseded"  # metrics only: a progress delivery replaced (deleted) by a newer one

    ACTIVE = nonmember((PENDING, SENDING))  # claimable once next_attempt_at has passed
    OPEN = nonmember((WAITING, PENDING, SENDING))  # not finished: later events wait behind these


_ACTIVE_SQL = text("status IN ('pending', 'sending')")
_WAITING_SQL = text("status = 'waiting'")


class WebhookDelivery(Base):
    """One event to one URL. ``event_id`` is the ``webhook-id``: the same on every attempt and replay.

    Per (job, URL) the deliveries form a chain in event order (webhooks/chain.py): one unfinished
    delivery is ``pending``/``sending`` (the cursor), the others are ``waiting``, so the dispatcher's
    claim is a plain walk of the due index, never a scan past blocked rows."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        # The dispatcher's claim scans only active rows, however many delivered rows accumulate.
        Index(
            "ix_webhook_deliveries_due",
            "next_attempt_at",
            postgresql_where=_ACTIVE_SQL,
            sqlite_where=_ACTIVE_SQL,
        ),
        # Per-job ordering and coalescing look at a job's deliveries in event order.
        Index("ix_webhook_deliveries_job_seq", "job_id", "event_seq"),
        # Deleting an event looks its deliveries up (its ON DELETE CASCADE, the pruner's checks).
        Index("ix_webhook_deliveries_event_seq", "event_seq"),
        # The sweep that repairs a lost cursor scans only waiting rows.
        Index(
            "ix_webhook_deliveries_waiting",
            "updated_at",
            postgresql_where=_WAITING_SQL,
            sqlite_where=_WAITING_SQL,
        ),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    event_seq: Mapped[int] = mapped_column(BigInteger, ForeignKey("job_events.seq", ondelete="CASCADE"))
    event_id: Mapped[str] = mapped_column(String(40))
    event_type: Mapped[str] = mapped_column(String(32))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    url: Mapped[str] = mapped_column(Text)
    # How it is sent (DeliveryKind): a standard webhook, a `split` profile callback, or an AMQP reply
    # (``url`` is then ``amqp:<queue>``).
    kind: Mapped[str] = mapped_column(String(16), default=DeliveryKind.STANDARD, server_default="standard")
    status: Mapped[str] = mapped_column(String(16), default=DeliveryStatus.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Attempts counted against the retry schedule start here; a replay moves it to `attempts`.
    retry_base: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(default=utcnow)
    # Set when a dispatcher claims the row; a result is only recorded under the same token.
    claim_token: Mapped[str | None] = mapped_column(String(36))
    last_status_code: Mapped[int | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    delivered_at: Mapped[datetime | None]

    attempt_log: Mapped[list[WebhookAttempt]] = relationship(
        order_by="WebhookAttempt.number",
        lazy="select",
        cascade="all, delete-orphan",
        passive_deletes=True,
    )


class WebhookAttempt(Base):
    """One HTTP attempt of a delivery, kept for the visibility endpoint."""

    __tablename__ = "webhook_attempts"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    delivery_id: Mapped[str] = mapped_column(
        ForeignKey("webhook_deliveries.id", ondelete="CASCADE"), index=True
    )
    number: Mapped[int]
    started_at: Mapped[datetime]
    duration_ms: Mapped[int]
    status_code: Mapped[int | None]
    error: Mapped[str | None] = mapped_column(Text)


class WebhookGoneURL(Base):
    """A URL that answered 410 Gone for a tenant: later events to it are recorded as gone, never sent."""

    __tablename__ = "webhook_gone_urls"
    # A hash in the key: URLs can be longer than a btree entry allows.
    __table_args__ = (UniqueConstraint("tenant_id", "url_sha256", name="uq_webhook_gone_urls_tenant_url"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    url: Mapped[str] = mapped_column(Text)
    url_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
