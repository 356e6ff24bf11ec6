"""Tenants as an operator manages them and a tenant sees itself, against the running system: keys
listed and revoked (refused within API_KEY_CACHE_SECONDS), a default webhook set by `tenants set`,
limits through the admin API visible at GET /v1/tenant, and the 429s a limit gives."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
import requests
from sqlalchemy.orm import Session, sessionmaker

from api.auth import create_tenant_key
from inference_server.tenancy.usage import next_month
from tests.support.jobs import submit, wait_done
from tests.support.system import cli, start_api
from tests.support.waiting import wait_for

BODY = {"family": "sd15", "prompt": "a kite", "width": 64, "height": 64, "steps": 1, "seed": 9}


def _client(base_url: str, key: str) -> requests.Session:
    http = requests.Session()
    http.headers["Authorization"] = f"Bearer {key}"
    http.base_url = base_url  # type: ignore[attr-defined]
    return http


@pytest.fixture
def admin(api_server: str, system_db: sessionmaker[Session]) -> requests.Session:
    with system_db() as session:
        _, key = create_tenant_key(session, f"ops-{uuid.uuid4().hex[:6]}", admin=True)
    return _client(api_server, key)


def _code(resp: requests.Response) -> str:
    return str(resp.json()["error"]["code"])


def test_a_revoked_key_is_refused_within_the_cache_lifetime(  # type: ignore[no-untyped-def]
    system_env, system_db, logs_dir: Path
) -> None:
    cache = 2.0
    proc, url = start_api(dict(system_env, API_KEY_CACHE_SECONDS=str(cache)), logs_dir, name="api-keycache")
    try:
        name = f"rev-{uuid.uuid4().hex[:8]}"
        with system_db() as session:
            _, first = create_tenant_key(session, name)
            _, second = create_tenant_key(session, name)
        listed = cli("keys", "list", "--tenant", name, env=system_env)
        assert listed.returncode == 0, listed.stderr
        keys = [json.loads(line) for line in listed.stdout.splitlines()]
        assert [(k["tenant"], k["admin"], k["revoked_at"]) for k in keys] == [(name, False, None)] * 2
        assert keys[1]["prefix"] == second[:12] and "api_key" not in keys[1]
        http = _client(url, second)
        assert http.get(f"{url}/v1/tenant", timeout=10).status_code == 200  # now in the key cache

        revoked = cli("keys", "revoke", keys[1]["prefix"], env=system_env)
        assert revoked.returncode == 0, revoked.stderr
        at = time.monotonic()
        assert json.loads(revoked.stdout)["revoked_at"] is not None
        wait_for(lambda: http.get(f"{url}/v1/tenant", timeout=10).status_code == 401, cache + 5, what="401")
        assert time.monotonic() - at <= cache + 5
        assert _code(http.get(f"{url}/v1/tenant", timeout=10)) == "invalid_api_key"
        again = cli("keys", "revoke", "isk_nosuchkey", env=system_env)
        assert again.returncode != 0 and "key_not_found" in again.stderr

        # A tenant's limit changes on the same clock: the tenant rides along with its cached key.
        live = _client(url, first)
        assert live.get(f"{url}/v1/tenant", timeout=10).status_code == 200
        assert cli("tenants", "set", "--tenant", name, "--rate-limit", "1", env=system_env).returncode == 0

        def limited() -> bool:
            return any(live.get(f"{url}/v1/tenant", timeout=10).status_code == 429 for _ in range(2))

        wait_for(limited, cache + 5, interval=0.2, what="the new rate limit to apply")
    finally:
        proc.kill(15)


def test_admin_api_lists_and_revokes_keys(admin, api_client, tenant) -> None:  # type: ignore[no-untyped-def]
    base = admin.base_url
    assert _code(api_client.get(f"{base}/v1/keys", timeout=10)) == "admin_required"
    keys = admin.get(f"{base}/v1/keys", params={"tenant": tenant.tenant.name}, timeout=10).json()["keys"]
    assert [k["prefix"] for k in keys] == [tenant.api_key[:12]]
    done = admin.post(f"{base}/v1/keys/{keys[0]['id']}/revoke", timeout=10)
    assert done.status_code == 200 and done.json()["revoked_at"]
    assert admin.post(f"{base}/v1/keys/nope/revoke", timeout=10).status_code == 404


def test_limits_and_usage_at_get_tenant(admin, api_client, tenant, worker) -> None:  # type: ignore[no-untyped-def]
    base, name = admin.base_url, tenant.tenant.name
    # Set before the tenant's first request: the API reads limits with the key (cached 30 s).
    changed = admin.patch(f"{base}/v1/tenants/{name}", json={"monthly_image_quota": 3}, timeout=10)
    assert changed.status_code == 200, changed.text
    assert changed.json()["limits"]["monthly_image_quota"] == 3
    assert _code(api_client.patch(f"{base}/v1/tenants/{name}", json={}, timeout=10)) == "admin_required"
    assert _code(admin.patch(f"{base}/v1/tenants/nobody-{uuid.uuid4().hex}", json={}, timeout=10)) == (
        "tenant_not_found"
    )
    assert admin.patch(f"{base}/v1/tenants/{name}", json={"colour": "red"}, timeout=10).status_code == 422

    first = submit(api_client, {**BODY, "num_images": 2})
    refused = api_client.post(f"{base}/v1/jobs", json={**BODY, "num_images": 2}, timeout=10)
    assert refused.status_code == 429 and _code(refused) == "quota_exceeded"
    expected = (next_month(datetime.now(UTC)) - datetime.now(UTC)).total_seconds()
    assert abs(int(refused.headers["Retry-After"]) - expected) < 60
    last = submit(api_client, BODY)  # the one image left
    mine = api_client.get(f"{base}/v1/tenant", timeout=10).json()
    assert mine["name"] == name and mine["limits"]["monthly_image_quota"] == 3
    assert mine["usage"]["images_this_month"] == 3
    assert mine["usage"]["running_jobs"] + mine["usage"]["queued_jobs"] <= 2
    for job in (first, last):
        assert wait_done(api_client, job["id"])["status"] == "succeeded"
    assert admin.get(f"{base}/v1/tenants/{name}", timeout=10).json()["usage"]["images_this_month"] == 3


def test_a_tenants_own_rate_limit(admin, api_client, tenant) -> None:  # type: ignore[no-untyped-def]
    base = admin.base_url
    admin.patch(f"{base}/v1/tenants/{tenant.tenant.name}", json={"rate_limit_per_minute": 3}, timeout=10)
    answers = [api_client.get(f"{base}/v1/tenant", timeout=10) for _ in range(4)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    assert answers[0].json()["limits"]["rate_limit_per_minute"] == 3
    assert _code(answers[3]) == "rate_limited" and int(answers[3].headers["Retry-After"]) >= 1


def test_the_default_webhook_set_by_the_cli(  # type: ignore[no-untyped-def]
    api_client, tenant, worker, dispatcher, receiver, system_env
) -> None:
    name = tenant.tenant.name
    args = ["--tenant", name, "--default-webhook", receiver.url, "--events", "job.succeeded"]
    done = cli("tenants", "set", *args, env=system_env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["default_webhook"] == {"url": receiver.url, "events": ["job.succeeded"]}
    bad = cli("tenants", "set", "--tenant", name, "--events", "job.exploded", env=system_env)
    assert bad.returncode != 0 and "job.exploded" in bad.stderr

    job = submit(api_client, BODY)  # names no webhook: the tenant's default gets it
    assert wait_done(api_client, job["id"])["status"] == "succeeded"
    wait_for(lambda: receiver.types(job["id"]) == ["job.succeeded"], 30, what="the default webhook")
