"""Logs as an operator's collector reads them: the processes the suite starts write to files, so
with the default ``LOG_FORMAT=auto`` they write JSON lines. A job's lines carry its fields through
the API and the worker; every request has one access line and an id it gets back; the dispatcher
says when a delivery fails, is given up or hits a 410; a worker's start is free of Celery's
delayed-delivery warning."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.support.jobs import submit, wait_done
from tests.support.system import Proc, start_api
from tests.support.waiting import wait_for

BODY = {"family": "sd15", "prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2}


def json_lines(proc: Proc) -> list[dict[str, Any]]:
    """Every log line of ``proc``, each of which must be one JSON object (Celery's own prints, such
    as its shutdown notice, are not log lines and are left out by their lack of a leading brace)."""
    lines = []
    for line in proc.output().splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


@pytest.fixture(scope="module")
def api(system_env: dict[str, str], logs_dir: Path) -> Iterator[tuple[Proc, str]]:
    proc, url = start_api(system_env, logs_dir, name="api-logs")
    yield proc, url
    proc.kill(15)


@pytest.fixture
def http(api: tuple[Proc, str], tenant: Any) -> Iterator[requests.Session]:
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {tenant.api_key}"
    session.base_url = api[1]  # type: ignore[attr-defined]
    yield session
    session.close()


def test_a_jobs_lines_carry_its_fields_in_the_api_and_the_worker(
    api: tuple[Proc, str], http: requests.Session, worker: Proc, tenant: Any
) -> None:
    job = submit(http, BODY)
    assert wait_done(http, job["id"])["status"] == "succeeded"
    expected = {"job_id": job["id"], "tenant": str(tenant.tenant.id), "family": "sd15"}

    def about_job(proc: Proc) -> list[dict[str, Any]]:
        return [line for line in json_lines(proc) if line.get("job_id") == job["id"]]

    queued = [line for line in about_job(api[0]) if line["message"].startswith("job queued")]
    assert len(queued) == 1, about_job(api[0])
    assert queued[0].items() >= {**expected, "attempt": 0, "role": "api", "level": "INFO"}.items()
    assert re.fullmatch(r"[0-9a-f]{32}", queued[0]["request_id"]), queued[0]

    lines = wait_for(
        lambda: (found := about_job(worker)) and any("succeeded" in x["message"] for x in found) and found,
        10,
        what="the worker's line about the job's end",
    )
    messages = [line["message"] for line in lines]
    assert any(m.startswith("job started") for m in messages), messages
    for line in lines:
        assert line.items() >= {**expected, "attempt": 1, "role": "worker"}.items(), line
        assert {"time", "level", "logger"} <= set(line)


def test_one_access_line_per_request_with_the_request_id_echoed(
    api: tuple[Proc, str], http: requests.Session
) -> None:
    job = submit(http, BODY)
    given = "trace-42.a:b_c"
    resp = http.get(f"{api[1]}/v1/jobs/{job['id']}", headers={"X-Request-ID": given}, timeout=10)
    assert resp.status_code == 200 and resp.headers["X-Request-ID"] == given
    # An id that is too long or holds unsafe characters is replaced, never echoed.
    for bad in ("x" * 129, "a b", "evil\u00e9"):
        answer = http.get(f"{api[1]}/v1/jobs/{job['id']}", headers={"X-Request-ID": bad.encode()}, timeout=10)
        assert re.fullmatch(r"[0-9a-f]{32}", answer.headers["X-Request-ID"]), answer.headers
    # Refusals and unknown routes are logged and carry an id too.
    missing = requests.get(f"{api[1]}/no/such/route", timeout=10)
    assert missing.status_code == 404 and missing.headers["X-Request-ID"]

    def access() -> list[dict[str, Any]]:
        return [x for x in json_lines(api[0]) if x["logger"] == "api.access"]

    wait_for(lambda: any(x["request_id"] == missing.headers["X-Request-ID"] for x in access()), 5, what="log")
    mine = [x for x in access() if x["request_id"] == given]
    assert len(mine) == 1, mine
    assert mine[0].items() >= {"method": "GET", "route": "/v1/jobs/{job_id}", "status": 200}.items()
    assert isinstance(mine[0]["duration_ms"], float) and mine[0]["duration_ms"] >= 0
    ids = [x["request_id"] for x in access()]
    assert len(ids) == len(set(ids)), "one access line per request"
    unmatched = [x for x in access() if x["request_id"] == missing.headers["X-Request-ID"]]
    assert unmatched[0]["route"] == "unmatched" and unmatched[0]["status"] == 404
    # Uvicorn's own access log is off: no line of the form `"GET /path HTTP/1.1" 200`.
    assert not re.search(r'"GET /\S* HTTP/1\.1" \d{3}', api[0].output())


def test_the_dispatcher_logs_failed_exhausted_and_gone_deliveries(
    http: requests.Session, worker: Proc, dispatcher: Proc, make_receiver: Any
) -> None:
    failing = make_receiver(lambda n, req: (500, {}, 0.0))
    gone = make_receiver(lambda n, req: (410, {}, 0.0))
    first = submit(http, {**BODY, "webhook": {"url": failing.url, "events": ["job.succeeded"]}})
    second = submit(http, {**BODY, "webhook": {"url": gone.url, "events": ["job.succeeded"]}})

    def lines_for(job_id: str) -> list[dict[str, Any]]:
        return [x for x in json_lines(dispatcher) if x.get("job_id") == job_id]

    # WEBHOOK_RETRY_DELAYS is 0.5,0.5,0.5 in the suite: four attempts, then it is given up.
    exhausted = wait_for(
        lambda: [x for x in lines_for(first["id"]) if x.get("outcome") == "exhausted"], 60, what="exhausted"
    )
    retries = [x for x in lines_for(first["id"]) if x.get("outcome") == "retry"]
    assert len(retries) == 3 and all("HTTP 500" in x["message"] for x in retries), retries
    assert exhausted[0]["level"] == "WARNING" and exhausted[0]["delivery_attempt"] == 4
    assert exhausted[0]["url"] == failing.url and exhausted[0]["tenant"]
    stopped = wait_for(
        lambda: [x for x in lines_for(second["id"]) if x.get("outcome") == "gone"], 60, what="gone"
    )
    assert stopped[0]["level"] == "WARNING" and "410" in stopped[0]["message"]


def test_a_worker_starts_without_celerys_delayed_delivery_warning(worker: Proc) -> None:
    out = worker.output()
    assert "ready." in out
    assert "native delayed delivery" not in out and "ETA tasks" not in out, out[:3000]
    assert "Global QoS is disabled" not in out
    lines = json_lines(worker)
    assert lines and all(x["role"] == "worker" for x in lines)
    # Nothing else reaches the stream: no banner, no library writing past logging with its own format.
    other = [line for line in out.splitlines() if line.strip() and not line.startswith("{")]
    assert not other, other[:10]
    # The engine's libraries (diffusers, transformers, torch) warn about their own future at import
    # and load; the worker has run jobs by now, so its child has imported and loaded them.
    warned = [
        x["message"] for x in lines if x["logger"] == "py.warnings" and "SecurityWarning" not in x["message"]
    ]
    assert not warned, warned
    assert not [x for x in lines if x["logger"].split(".")[0] in ("diffusers", "transformers", "torch")]


def test_a_worker_on_rabbitmq_before_3_12_warns_about_per_queue_consumer_timeouts(
    worker: Proc, broker_url: str
) -> None:
    from inference_server.publish.broker_version import parse_version, server_version

    version = server_version(broker_url)
    parsed = parse_version(version or "")
    assert parsed is not None, version  # the suite's broker is RabbitMQ over AMQP
    warnings = [x for x in json_lines(worker) if x["logger"] == "inference_server.publish.broker_version"]
    if parsed[:2] < (3, 12):
        assert len(warnings) == 1 and warnings[0]["level"] == "WARNING", warnings
        assert warnings[0]["broker_version"] == version and "3.12" in warnings[0]["message"]
    else:
        assert not warnings
    assert parse_version("3.10.7") == (3, 10, 7) and parse_version("4.0") == (4, 0, 0)
    assert parse_version("not a version") is None
