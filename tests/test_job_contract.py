"""One job contract from the API to the worker: what the API stores is a JobSpec, the worker reads it
back through the same type, and the request's small rules (NaN, filters, event names) hold."""

from __future__ import annotations

import math

import pytest
import requests
from sqlalchemy import select

from inference_server.db import Job
from inference_server.db.base import new_id
from inference_server.jobs import transitions
from inference_server.jobs.enums import ClaimRefusal, EventType, Task
from inference_server.jobs.spec import JobRequest, JobSpec, public_params
from tests.support.jobs import submit

OK = {"family": "sd15", "prompt": "a lighthouse", "width": 64, "height": 64, "steps": 4}


def post_raw(http: requests.Session, raw: str) -> requests.Response:
    return http.post(
        f"{http.base_url}/v1/jobs",  # type: ignore[attr-defined]
        data=raw,
        headers={"Content-Type": "application/json"},
        timeout=30,
    )


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_guidance_is_refused_as_not_a_number(api_client: requests.Session, value: str) -> None:
    # Python's json (and so the API) reads these tokens; a bound check alone would call NaN "out of range".
    resp = post_raw(api_client, '{"family": "sd15", "prompt": "x", "guidance_scale": ' + value + "}")
    assert resp.status_code == 422, resp.text
    error = resp.json()["error"]
    assert error["code"] == "validation_error"
    assert "guidance_scale" in error["message"] and "not numbers" in error["message"], error


def test_the_api_stores_a_job_spec_and_shows_the_request(api_client, system_db) -> None:  # type: ignore[no-untyped-def]
    job = submit(api_client, {**OK, "seed": 40, "num_images": 3})
    with system_db() as session:
        stored = session.scalar(select(Job.params).where(Job.id == job["id"]))
    spec = JobSpec.model_validate(stored)
    assert spec.seeds == [40, 41, 42] and spec.model == job["model"] and spec.task is Task.TXT2IMG
    assert spec.steps == 4 and spec.planned_steps() == 4
    # The public view keeps the request's own words: one seed and a count.
    assert job["params"]["seed"] == 40 and job["params"]["num_images"] == 3
    assert "seeds" not in job["params"] and public_params(stored) == job["params"]


def test_strength_plans_the_steps_that_run() -> None:
    spec = JobSpec(family="sd15", model="m", task=Task.IMG2IMG, steps=10, strength=0.5, seeds=[1])
    assert spec.planned_steps() == spec.planned_steps("ceil") == 5


def test_a_spec_stored_before_seed_lists_still_runs() -> None:
    legacy = {"family": "sd15", "model": "m", "task": "txt2img", "steps": 4, "seed": 9, "num_images": 2}
    assert JobSpec.model_validate(legacy).seeds == [9, 10]


def test_a_stored_job_that_does_not_validate_fails_at_the_claim(tenant, system_db) -> None:  # type: ignore[no-untyped-def]
    # What an incompatible release or a hand edit could leave (no outbox row: no worker sees it).
    params = {"family": "sd15", "model": "tiny-sd15", "task": "txt2img", "steps": "many", "seeds": [1]}
    job_id = new_id()
    with system_db() as session:
        session.add(Job(id=job_id, tenant_id=tenant.tenant.id, family="sd15", task="txt2img", params=params))
        session.commit()
    with system_db() as session:
        refusal = transitions.claim(session, job_id, max_attempts=3, lease_seconds=30)
    assert refusal == ClaimRefusal.INVALID
    with system_db() as session:
        row = session.get(Job, job_id)
        assert row is not None
        assert (row.status, row.error_code, row.attempts) == ("failed", "invalid_job_spec", 0)


def test_unknown_list_filters_are_refused(api_client: requests.Session) -> None:
    base = api_client.base_url  # type: ignore[attr-defined]
    resp = api_client.get(f"{base}/v1/jobs", params={"task": "inpaint"}, timeout=30)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["code"] == "invalid_filter" and "'task'" in resp.json()["error"]["message"]
    assert api_client.get(f"{base}/v1/jobs", params={"status": "queued", "limit": 5}, timeout=30).ok


def test_webhook_event_shorthand_is_accepted_as_the_dispatcher_reads_it() -> None:
    req = JobRequest.model_validate(
        {**OK, "webhook": {"url": "https://example.com/h", "events": ["succeeded", "job.failed"]}}
    )
    assert req.webhook is not None and req.webhook.events == [EventType.SUCCEEDED, EventType.FAILED]
    with pytest.raises(ValueError, match="unknown event 'done'"):
        JobRequest.model_validate({**OK, "webhook": {"url": "https://example.com/h", "events": ["done"]}})


def test_shorthand_events_reach_the_api_as_full_names(api_client: requests.Session) -> None:
    body = {**OK, "webhook": {"url": "https://example.com/h", "events": ["succeeded"]}}
    resp = api_client.post(f"{api_client.base_url}/v1/jobs", json=body, timeout=30)  # type: ignore[attr-defined]
    assert resp.status_code == 202, resp.text


def test_finite_numbers_still_pass() -> None:
    assert JobRequest.model_validate({**OK, "guidance_scale": 7.5}).guidance_scale == 7.5
    assert math.isfinite(JobRequest.model_validate({**OK, "strength": "0.5"}).strength or 0)


def test_a_task_the_family_lacks_is_named_as_the_client_wrote_it(api_client: requests.Session) -> None:
    resp = api_client.post(
        f"{api_client.base_url}/v1/jobs",  # type: ignore[attr-defined]
        json={**OK, "task": "edit", "image": "https://example.com/a.png", "prompt": "make it red"},
        timeout=30,
    )
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["code"] == "unsupported_task" and "'edit'" in error["message"]
    assert "Task." not in error["message"], error
