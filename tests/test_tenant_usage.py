"""The monthly image count and its quota (inference_server/tenancy/usage.py) on PostgreSQL and on
SQLite (the embedded `up`): counted per UTC month, refused past the quota with the seconds to the
next month, never over the quota when submits race."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from inference_server.db import Tenant, make_database, make_session_factory
from inference_server.migrate import upgrade
from inference_server.tenancy.usage import QuotaExceeded, charge, next_month, usage_view
from tests.support.seed import add_tenant

DEC = datetime(2026, 12, 31, 23, 59, 0, tzinfo=UTC)


@pytest.fixture(params=["postgresql", "sqlite"])
def sessions(request, tmp_path: Path) -> Iterator[sessionmaker[Session]]:  # type: ignore[no-untyped-def]
    if request.param == "postgresql":
        yield request.getfixturevalue("scratch_db")
        return
    url = f"sqlite:///{tmp_path / 'usage.sqlite'}"
    upgrade(url)
    engine = make_database(url)
    yield make_session_factory(engine)
    engine.dispose()


def _tenant(sessions: sessionmaker[Session], quota: int | None) -> Tenant:
    with sessions() as s, s.begin():
        tenant = add_tenant(s, monthly_image_quota=quota)
        s.expunge(tenant)
    return tenant


def _charge(sessions: sessionmaker[Session], tenant: Tenant, images: int, now: datetime = DEC) -> None:
    with sessions() as s, s.begin():
        charge(s, tenant, images, now)


def _used(sessions: sessionmaker[Session], tenant: Tenant, now: datetime = DEC) -> int:
    with sessions() as s:
        return int(usage_view(s, tenant, now)["images_this_month"])


def test_images_count_per_month_up_to_the_quota(sessions: sessionmaker[Session]) -> None:
    tenant = _tenant(sessions, quota=5)
    _charge(sessions, tenant, 2)
    _charge(sessions, tenant, 3)
    assert _used(sessions, tenant) == 5
    with pytest.raises(QuotaExceeded) as refused:
        _charge(sessions, tenant, 1)
    assert refused.value.code == "quota_exceeded" and refused.value.retry_after == 60.0
    assert _used(sessions, tenant) == 5  # the refused images are not counted
    january = datetime(2027, 1, 1, 0, 0, 1, tzinfo=UTC)
    _charge(sessions, tenant, 5, january)  # a new month, a new count
    assert _used(sessions, tenant, january) == 5 and _used(sessions, tenant) == 5
    with pytest.raises(QuotaExceeded):
        _charge(sessions, tenant, 6, datetime(2027, 2, 1, tzinfo=UTC))  # more than the quota at once


def test_without_a_quota_images_are_only_counted(sessions: sessionmaker[Session]) -> None:
    tenant = _tenant(sessions, quota=None)
    for _ in range(3):
        _charge(sessions, tenant, 40)
    assert _used(sessions, tenant) == 120


def test_racing_submits_never_pass_the_quota(scratch_db: sessionmaker[Session]) -> None:
    tenant = _tenant(scratch_db, quota=10)
    taken: list[int] = []
    barrier = threading.Barrier(8)

    def submit() -> None:
        barrier.wait()
        for _ in range(5):
            try:
                _charge(scratch_db, tenant, 1)
                taken.append(1)
            except QuotaExceeded:
                pass

    threads = [threading.Thread(target=submit) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(taken) == 10 and _used(scratch_db, tenant) == 10


def test_a_tenant_without_a_quota_counts_over_shards_and_a_quota_set_later_sees_them(
    sessions: sessionmaker[Session],
) -> None:
    from sqlalchemy import func, select

    from inference_server.db import TenantUsage

    tenant = _tenant(sessions, quota=None)
    for _ in range(40):
        _charge(sessions, tenant, 1)
    with sessions() as s:
        shards = s.scalar(select(func.count()).where(TenantUsage.tenant_id == tenant.id))
    # Spread so that concurrent submits of one tenant do not queue behind one row's lock.
    assert shards is not None and shards > 1
    assert _used(sessions, tenant) == 40
    tenant.monthly_image_quota = 45  # what a changed tenant row looks like to the next submit
    _charge(sessions, tenant, 5)
    with pytest.raises(QuotaExceeded) as refused:
        _charge(sessions, tenant, 1)
    assert "0 of 45 images left" in refused.value.message
    assert _used(sessions, tenant) == 45


def test_racing_submits_without_a_quota_count_every_image(scratch_db: sessionmaker[Session]) -> None:
    tenant = _tenant(scratch_db, quota=None)
    barrier = threading.Barrier(8)

    def submit() -> None:
        barrier.wait()
        for _ in range(25):
            _charge(scratch_db, tenant, 2)

    threads = [threading.Thread(target=submit) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert _used(scratch_db, tenant) == 8 * 25 * 2


def test_next_month_is_utc() -> None:
    assert next_month(DEC) == datetime(2027, 1, 1, tzinfo=UTC)
    assert next_month(datetime(2026, 3, 15, 12, tzinfo=UTC)) == datetime(2026, 4, 1, tzinfo=UTC)
