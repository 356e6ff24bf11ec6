"""What a tenant used: images submitted per calendar month (UTC), the monthly quota checked against
them in the submit's own transaction, and the jobs it has running now."""

from __future__ import annotations

import functools
import random
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import bindparam, func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from inference_server.db import Job, Tenant, TenantUsage
from inference_server.errors import RateLimited
from inference_server.jobs.enums import JobStatus

SHARDS = 64  # rows a month's count of a tenant without a quota is spread over


class QuotaExceeded(RateLimited):
    """The tenant's monthly images are spent; ``retry_after`` is the seconds to the next month."""

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message, code="quota_exceeded")
        self.retry_after = retry_after


def month_of(now: datetime) -> str:
    return now.astimezone(UTC).strftime("%Y-%m")


def next_month(now: datetime) -> datetime:
    """The first instant of the month after ``now``'s, in UTC."""
    now = now.astimezone(UTC)
    year, month = (now.year + 1, 1) if now.month == 12 else (now.year, now.month + 1)
    return datetime(year, month, 1, tzinfo=UTC)


def charge(session: Session, tenant: Tenant, images: int, now: datetime) -> None:
    """Count ``images`` against the tenant's month, or raise ``QuotaExceeded`` if they would take it
    past ``monthly_image_quota``; in the caller's transaction (a failed submit gives them back).

    Without a quota the images go to one of ``SHARDS`` rows chosen at random: a submit holds its
    row's lock until it commits, and one row would make all of a tenant's submits commit one after
    the other. With a quota the check must see the whole month, so shard 0 carries it: one upsert
    whose update is conditional on the month's sum (the other shards, written while the tenant had
    no quota, only count), and two submits at once cannot both take the last images."""
    quota = tenant.monthly_image_quota or 0
    u = TenantUsage.__table__  # the Table: an upsert needs its columns
    insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    month = month_of(now)
    if not quota:
        # Built once per dialect: on the submit path, constructing the upsert cost more than running it.
        session.execute(
            _add_to_shard(insert),
            {"tenant_id": tenant.id, "month": month, "shard": random.randrange(SHARDS), "images": images},
        )
        return
    others = session.scalar(
        select(func.coalesce(func.sum(u.c.images), 0)).where(
            u.c.tenant_id == tenant.id, u.c.month == month, u.c.shard != 0
        )
    )
    room = quota - int(others or 0)
    taken = None
    if images <= room:
        stmt = insert(TenantUsage).values(tenant_id=tenant.id, month=month, shard=0, images=images)
        stmt = stmt.on_conflict_do_update(
            index_elements=[u.c.tenant_id, u.c.month, u.c.shard],
            set_={"images": u.c.images + images},
            where=u.c.images + images <= room,
        )
        taken = session.execute(stmt.returning(u.c.images)).first()
    if taken is not None:
        return
    left = max(0, quota - used_images(session, tenant, now))
    raise QuotaExceeded(
        f"monthly image quota reached: {left} of {quota} images left this month, this job asks for {images}",
        retry_after=(next_month(now) - now).total_seconds(),
    )


@functools.cache
def _add_to_shard(insert: Any) -> Any:
    u = TenantUsage.__table__
    stmt = insert(u).values(
        tenant_id=bindparam("tenant_id"),
        month=bindparam("month"),
        shard=bindparam("shard"),
        images=bindparam("images"),
    )
    return stmt.on_conflict_do_update(
        index_elements=[u.c.tenant_id, u.c.month, u.c.shard],
        set_={"images": u.c.images + stmt.excluded.images},
    )


def used_images(session: Session, tenant: Tenant, now: datetime) -> int:
    """Images the tenant submitted in ``now``'s month: the sum of the month's shards."""
    u = TenantUsage.__table__
    total = session.scalar(
        select(func.sum(u.c.images)).where(u.c.tenant_id == tenant.id, u.c.month == month_of(now))
    )
    return int(total or 0)


def usage_view(session: Session, tenant: Tenant, now: datetime) -> dict[str, Any]:
    """The tenant's use now: images this month, jobs running and queued."""
    images = used_images(session, tenant, now)
    counts = dict(
        session.execute(
            select(Job.status, func.count())
            .where(Job.tenant_id == tenant.id, Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]))
            .group_by(Job.status)
        ).all()
    )
    return {
        "month": month_of(now),
        "images_this_month": int(images or 0),
        "month_resets_at": next_month(now).isoformat().replace("+00:00", "Z"),
        "running_jobs": int(counts.get(JobStatus.RUNNING.value, 0)),
        "queued_jobs": int(counts.get(JobStatus.QUEUED.value, 0)),
    }
