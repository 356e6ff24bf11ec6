"""Progress events against real PostgreSQL: stored as the full webhook body only when a webhook
destination takes ``job.progress``; otherwise a compact record the dispatcher never reads."""

from __future__ import annotations

import json
from typing import Any

import pytest
from sqlalchemy import select

from inference_server.db import Job, JobEvent
from inference_server.events import emit_progress
from tests.support.seed import add_job, add_tenant
from tests.support.waiting import wait_for
from webhooks.fanout import fan_out
from webhooks.tables import WebhookDelivery
from workers.progress import ProgressWatcher

HOOK = "http://127.0.0.1:9/hook"

# (job webhook, job events, tenant default webhook, tenant default events) -> full snapshot?
CASES = [
    pytest.param(None, None, None, None, False, id="no webhook anywhere"),
    pytest.param(HOOK, None, None, None, True, id="job webhook, all events"),
    pytest.param(HOOK, ["succeeded", "failed"], None, None, False, id="job webhook without progress"),
    pytest.param(HOOK, ["job.progress"], None, None, True, id="job webhook with progress"),
    pytest.param(None, None, HOOK, ["progress"], True, id="tenant default with progress"),
    pytest.param(None, None, HOOK, ["job.succeeded"], False, id="tenant default without progress"),
    # The job's own webhook decides, even when the tenant's default would take progress.
    pytest.param(HOOK, ["succeeded"], HOOK, None, False, id="job filter over tenant default"),
]


def running_job(s: Any, url: str | None, events: list[str] | None, **tenant: Any) -> Job:
    job = add_job(s, add_tenant(s, **tenant), url, events)
    job.status, job.attempts, job.progress_step, job.progress_total = "running", 1, 3, 8
    job.params = {"prompt": "a long prompt " * 50}
    s.flush()
    return job


@pytest.mark.parametrize(("url", "events", "default_url", "default_events", "full"), CASES)
def test_progress_is_full_only_when_a_destination_takes_it(  # type: ignore[no-untyped-def]
    scratch_db, url, events, default_url, default_events, full
) -> None:
    with scratch_db() as s, s.begin():
        job = running_job(
            s, url, events, default_webhook_url=default_url, default_webhook_events=default_events
        )
        emit_progress(s, job)
        job_id = job.id
    with scratch_db() as s:
        # A compact event is never handed to the dispatcher's fan-out.
        assert s.scalar(select(JobEvent.fanned_out).where(JobEvent.job_id == job_id)) is not full
    with scratch_db() as s, s.begin():
        fan_out(s)
    with scratch_db() as s:
        [event] = s.scalars(select(JobEvent).where(JobEvent.job_id == job_id))
        deliveries = s.scalars(select(WebhookDelivery).where(WebhookDelivery.job_id == job_id)).all()
    data = event.payload["data"]
    assert event.type == event.payload["type"] == "job.progress" and event.payload["timestamp"]
    assert data["id"] == job_id and data["status"] == "running"
    assert data["progress"] == {"step": 3, "total_steps": 8, "percent": 37.5, "eta_seconds": None}
    assert event.fanned_out
    if full:
        assert "compact" not in event.payload and data["params"]["prompt"].startswith("a long prompt")
        assert [d.event_type for d in deliveries] == ["job.progress"]
    else:
        assert event.payload["compact"] is True and set(data) == {"id", "status", "progress"}
        assert len(json.dumps(event.payload)) < 300  # no snapshot: the prompt alone is 700 bytes
        assert deliveries == []


def test_the_progress_watcher_writes_compact_events_for_a_job_without_webhook(scratch_db) -> None:  # type: ignore[no-untyped-def]
    with scratch_db() as s, s.begin():
        job_id = running_job(s, None, None).id
    watcher = ProgressWatcher(scratch_db, job_id, 1, progress_interval=0.0, poll_interval=0.02)
    with watcher:
        watcher.on_step(5, 8)

        def written() -> list[JobEvent]:
            with scratch_db() as s:
                return list(s.scalars(select(JobEvent).where(JobEvent.job_id == job_id)))

        assert wait_for(lambda: len(written()) == 1, 5, what="the state this test expects")
    [event] = written()
    assert event.payload["compact"] is True and event.fanned_out
    assert event.payload["data"]["progress"]["step"] == 5
