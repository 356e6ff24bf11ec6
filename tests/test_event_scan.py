"""The read behind live streams (``jobs.history.scan``) on PostgreSQL: a sequence number taken by a
transaction that commits after a later one is reported missing, then delivered once it commits;
only the jobs and tenants asked for come back in full."""

from __future__ import annotations

from inference_server.jobs import history
from tests.support.seed import add_event, add_job, add_tenant


def test_a_late_commit_is_found_by_the_next_scan(scratch_db) -> None:  # type: ignore[no-untyped-def]
    with scratch_db() as setup:
        tenant, other = add_tenant(setup), add_tenant(setup)
        job, theirs = add_job(setup, tenant, None), add_job(setup, other, None)
        setup.commit()
        with setup.connection() as conn:
            start = history.last_seq(conn)
    slow, quick = scratch_db(), scratch_db()
    try:
        late = add_event(slow, job, "job.progress", step=1)  # takes its number first, commits last
        early = add_event(quick, job, "job.progress", step=2)
        add_event(quick, theirs, "job.progress", step=1)
        quick.commit()
        assert late.seq < early.seq
        with scratch_db() as reader:
            first = history.scan(reader.connection(), start, [], jobs=[job.id], tenants=[])
        assert [e.seq for e in first.events] == [early.seq]  # not the other tenant's job
        assert first.missing == [late.seq] and first.high == early.seq + 1
        slow.commit()
        with scratch_db() as reader:
            second = history.scan(reader.connection(), first.high, first.missing, jobs=[job.id], tenants=[])
        assert [e.seq for e in second.events] == [late.seq] and second.missing == []
        with scratch_db() as reader:
            by_tenant = history.scan(reader.connection(), start, [], jobs=[], tenants=[other.id])
        assert [e.job_id for e in by_tenant.events] == [theirs.id]
    finally:
        slow.close()
        quick.close()
