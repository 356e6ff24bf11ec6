"""The `split` webhook profile through the running system: a tenant set to `split` with a token (by
`inference-server tenants set`) gets PATCH {url}/progress and POST {url}/complete with its token;
a job that asks for `split` itself and fails gets POST {url}/failed. Every callback is signed and
carries webhook-id, and nothing goes to an endpoint the profile does not have."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

from tests.support.jobs import submit, wait_done
from tests.support.system import ROOT
from tests.support.waiting import wait_for
from webhooks import verify

# Enough steps that the worker reports progress at least once (PROGRESS_INTERVAL is 0.2 s in tests).
BODY = {"family": "sd15", "prompt": "a harbour", "width": 64, "height": 64, "steps": 40, "seed": 11}


def _calls(receiver, job_id: str) -> list:  # type: ignore[no-untyped-def,type-arg]
    return [r for r in receiver.events() if r.json().get("job_id") == job_id]


def test_a_split_tenant_gets_progress_and_complete_with_its_token(  # type: ignore[no-untyped-def]
    system_env, api_client, tenant, worker, dispatcher, receiver
):
    token = f"tok-{uuid.uuid4().hex}"
    cli = subprocess.run(
        [sys.executable, "-m", "inference_server.cli.main", "tenants", "set", "--tenant", tenant.tenant.name,
         "--webhook-profile", "split", "--webhook-token", token],
        env=system_env, cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    shown = json.loads(cli.stdout)
    assert {k: shown[k] for k in ("tenant", "webhook_profile", "webhook_token")} == {
        "tenant": tenant.tenant.name,
        "webhook_profile": "split",
        "webhook_token": "set",
    }
    key = f"gen-{uuid.uuid4().hex[:8]}"
    job = submit(api_client, {**BODY, "webhook": {"url": receiver.url}}, **{"Idempotency-Key": key})
    done = wait_done(api_client, job["id"], timeout=90)
    assert done["status"] == "succeeded"
    wait_for(
        lambda: any(r.path == "/hook/complete" for r in _calls(receiver, job["id"])),
        20,
        what="POST /complete",
    )
    calls = _calls(receiver, job["id"])
    assert {(r.method, r.path) for r in calls} == {("PATCH", "/hook/progress"), ("POST", "/hook/complete")}
    for r in calls:
        assert r.headers["authorization"] == f"Bearer {token}"
        assert r.headers["x-request-source"] == "inference-server"
        assert r.headers["webhook-id"].startswith("msg_")
        verify(r.body, r.headers, tenant.webhook_secret)  # signed over the split body itself
    progress = [r.json() for r in calls if r.method == "PATCH"]
    assert progress[0]["generation_id"] == key and progress[0]["job_id"] == job["id"]
    assert set(progress[0]["progress"]) == {
        "current_step",
        "total_steps",
        "progress_percent",
        "estimated_seconds",
    }
    [complete] = [r.json() for r in calls if r.path == "/hook/complete"]
    assert complete["generation_id"] == key and complete["status"] == "completed"
    assert complete["result_url"] == done["outputs"][0]["url"]
    assert complete["metadata"]["seed"] == 11 and complete["metadata"]["steps"] == 40
    assert "guidance_scale" in complete["metadata"]
    assert len({r.headers["webhook-id"] for r in calls}) == len(calls)  # one id per event


def test_a_job_asking_for_split_reports_its_failure_to_failed(  # type: ignore[no-untyped-def]
    api_client, tenant, worker, dispatcher, receiver, make_receiver
):
    missing = make_receiver(lambda n, req: (404, {}, 0.0))  # the input image URL answers 404
    body = {
        **BODY,
        "steps": 2,
        "task": "img2img",
        "image": missing.url + "/in.png",
        "webhook": {"url": receiver.url, "profile": "split"},
    }
    job = submit(api_client, body)
    done = wait_done(api_client, job["id"], timeout=90)
    assert done["status"] == "failed"
    wait_for(lambda: _calls(receiver, job["id"]), 20, what="POST /failed")
    [failed] = _calls(receiver, job["id"])
    assert (failed.method, failed.path) == ("POST", "/hook/failed")
    assert "authorization" not in failed.headers  # this tenant set no token
    payload = verify(failed.body, failed.headers, tenant.webhook_secret)
    assert payload["error_code"] == done["error"]["code"]
    assert payload["error_message"] == done["error"]["message"]
    assert payload["generation_id"] == job["id"]  # no idempotency key: the job id
