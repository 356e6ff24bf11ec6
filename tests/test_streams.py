"""Job event streams through the real system: SSE from two API processes on one database (events
the worker writes reach both through LISTEN/NOTIFY; a stream dropped on one resumes on the other
with Last-Event-ID, with no gap and no repeat), the WebSocket, the tenant-wide stream, keep-alives."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from inference_server.client import Client
from tests.support import jobs
from tests.support.system import Proc, start_api

BODY = {"family": "sd15", "prompt": "a tide", "width": 256, "height": 256, "steps": 30, "seed": 3}


@pytest.fixture(scope="module")
def second_api(system_env: dict[str, str], logs_dir: Path, api_server: str) -> Iterator[str]:
    """Another API process on the same database, with a short keep-alive interval."""
    proc: Proc
    proc, url = start_api(dict(system_env, STREAM_KEEPALIVE_SECONDS="0.3"), logs_dir, name="api2")
    yield url
    proc.kill(15)


def history(http: requests.Session, base: str, job_id: str) -> list[dict[str, Any]]:
    resp = http.get(f"{base}/v1/jobs/{job_id}/events", timeout=10)
    assert resp.status_code == 200, resp.text
    return resp.json()["events"]  # type: ignore[no-any-return]


def sse_lines(http: requests.Session, url: str, **headers: str) -> Iterator[str]:
    """The raw lines of an SSE response."""
    with http.get(url, headers={"Accept": "text/event-stream", **headers}, stream=True, timeout=30) as resp:
        assert resp.status_code == 200, resp.text
        assert resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            yield line.decode()


def sse_events(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    """Parsed by hand (not by the client library under test): id, event, data per blank line."""
    fields: dict[str, str] = {}
    for line in lines:
        if not line:
            if fields:
                yield {"seq": int(fields["id"]), "type": fields["event"], "body": json.loads(fields["data"])}
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(": ")
            fields[name] = value


def test_sse_from_two_api_processes_and_a_resume_on_the_other(
    api_client, api_server, second_api, worker
) -> None:  # type: ignore[no-untyped-def]
    job = jobs.submit(api_client, BODY)
    seen: dict[str, list[dict[str, Any]]] = {}

    def watch(name: str, base: str) -> None:
        seen[name] = list(sse_events(sse_lines(api_client, f"{base}/v1/jobs/{job['id']}/events")))

    watchers = [
        threading.Thread(target=watch, args=(n, b)) for n, b in (("a", api_server), ("b", second_api))
    ]
    for t in watchers:
        t.start()
    # Meanwhile: a third stream on the second API, dropped after two events and resumed on the first.
    first = sse_events(sse_lines(api_client, f"{second_api}/v1/jobs/{job['id']}/events"))
    head = [next(first), next(first)]
    first.close()
    rest = list(
        sse_events(
            sse_lines(
                api_client,
                f"{api_server}/v1/jobs/{job['id']}/events",
                **{"Last-Event-ID": str(head[-1]["seq"])},
            )
        )
    )
    for t in watchers:
        t.join(120)
    stored = history(api_client, api_server, job["id"])
    expected = [(e["seq"], e["type"]) for e in stored]
    assert expected[-1][1] == "job.succeeded"
    assert sum(1 for _, t in expected if t == "job.progress") >= 1, expected  # a run, not just its ends
    for name in ("a", "b"):
        assert [(e["seq"], e["type"]) for e in seen[name]] == expected, name
    assert [(e["seq"], e["type"]) for e in head + rest] == expected
    last = seen["b"][-1]["body"]
    assert last["type"] == "job.succeeded" and last["data"]["outputs"][0]["url"].startswith(second_api)
    # Resuming after the terminal event: nothing more, and the stream ends.
    after_end = {"Last-Event-ID": str(expected[-1][0])}
    assert (
        list(sse_events(sse_lines(api_client, f"{second_api}/v1/jobs/{job['id']}/events", **after_end))) == []
    )


def test_the_client_library_streams_and_resumes(api_server, tenant, worker) -> None:  # type: ignore[no-untyped-def]
    with Client(api_server, tenant.api_key) as client:
        job = client.submit(BODY)
        events = list(client.stream(job["id"]))
        assert events[-1].type == "job.succeeded" and events[-1].terminal
        assert [e.seq for e in events] == sorted({e.seq for e in events})
        resumed = list(client.stream(job["id"], last_event_id=events[1].seq))
        assert [e.seq for e in resumed] == [e.seq for e in events[2:]]
        assert list(client.stream(job["id"], last_event_id=events[-1].seq)) == []


def test_websocket_carries_the_same_events(api_client, api_server, second_api, tenant, worker) -> None:  # type: ignore[no-untyped-def]
    job = jobs.submit(api_client, BODY)
    ws_url = second_api.replace("http://", "ws://") + f"/v1/jobs/{job['id']}/ws"
    # The browser way: the key as a subprotocol; the server selects the plain protocol name.
    with connect(ws_url, subprotocols=["inference-server", f"bearer.{tenant.api_key}"]) as ws:  # type: ignore[list-item]
        assert ws.subprotocol == "inference-server"
        got = []
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                got.append(json.loads(ws.recv(timeout=60)))
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1000
    stored = history(api_client, api_server, job["id"])
    assert [(m["seq"], m["type"]) for m in got] == [(e["seq"], e["type"]) for e in stored]
    assert got[-1]["type"] == "job.succeeded"
    # The header way, resuming after the first event.
    headers = {"Authorization": f"Bearer {tenant.api_key}"}
    with connect(f"{ws_url}?last_event_id={got[0]['seq']}", additional_headers=headers) as ws:
        again = []
        with pytest.raises(ConnectionClosed):
            while True:
                again.append(json.loads(ws.recv(timeout=30))["seq"])
    assert again == [m["seq"] for m in got[1:]]


def test_refusals_on_the_websocket(api_client, api_server, tenant) -> None:  # type: ignore[no-untyped-def]
    job = jobs.submit(api_client, {**BODY, "steps": 1})
    base = api_server.replace("http://", "ws://")
    for protocols, path, code, error in (
        (["inference-server", "bearer.isk_wrong"], f"/v1/jobs/{job['id']}/ws", 4401, "invalid_api_key"),
        (["inference-server", f"bearer.{tenant.api_key}"], "/v1/jobs/no-such-job/ws", 4404, "job_not_found"),
    ):
        with connect(base + path, subprotocols=protocols) as ws:  # type: ignore[arg-type]
            assert json.loads(ws.recv(timeout=10))["error"]["code"] == error
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=10)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == code


def test_tenant_stream_sees_all_its_jobs_and_no_other_tenants(
    api_client, second_api, system_db, worker
) -> None:  # type: ignore[no-untyped-def]
    from api.auth import create_tenant_key

    with system_db() as session:
        _, other_key = create_tenant_key(session, "stream-other")
    other = requests.Session()
    other.headers["Authorization"] = f"Bearer {other_key}"
    other.base_url = second_api  # type: ignore[attr-defined]
    got: list[dict[str, Any]] = []
    opened = threading.Event()

    def watch() -> None:
        lines = sse_lines(api_client, f"{second_api}/v1/events")
        assert next(lines) == ": stream open"
        opened.set()
        ends = 0
        for event in sse_events(lines):
            got.append(event)
            ends += event["type"] == "job.succeeded"
            if ends == 2:
                return

    watcher = threading.Thread(target=watch)
    watcher.start()
    assert opened.wait(30)
    theirs = jobs.submit(other, {**BODY, "steps": 2})
    mine = [jobs.submit(api_client, {**BODY, "steps": 2, "seed": s}) for s in (1, 2)]
    watcher.join(120)
    assert not watcher.is_alive()
    by_job: dict[str, list[str]] = {}
    for e in got:
        by_job.setdefault(e["body"]["data"]["id"], []).append(e["type"])
    assert set(by_job) == {j["id"] for j in mine}, by_job
    for types in by_job.values():
        assert types[0] == "job.queued" and types[-1] == "job.succeeded" and "job.started" in types
    assert theirs["id"] not in by_job
    # Resuming the tenant stream after its first event replays the rest, each once, in sequence
    # order. Live, two jobs' events may arrive out of sequence order (a sequence number is taken
    # before its transaction commits, and two jobs' writers commit independently); a job's own
    # events never do (their writers lock the job's row).
    seqs = [e["seq"] for e in got]
    replay = sse_events(sse_lines(api_client, f"{second_api}/v1/events", **{"Last-Event-ID": str(seqs[0])}))
    after = sorted(seq for seq in seqs[1:] if seq > seqs[0])
    assert [next(replay)["seq"] for _ in after] == after
    replay.close()
    # Another tenant's job is not found, as JSON, as a stream and as events.
    for accept in ("application/json", "text/event-stream"):
        resp = api_client.get(
            f"{second_api}/v1/jobs/{theirs['id']}/events", headers={"Accept": accept}, timeout=10
        )
        assert resp.status_code == 404 and resp.json()["error"]["code"] == "job_not_found"
    bad = api_client.get(
        f"{second_api}/v1/jobs/{mine[0]['id']}/events", headers={"Last-Event-ID": "x1"}, timeout=10
    )
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_last_event_id"


def test_keep_alive_comments_on_an_idle_stream(api_client, second_api) -> None:  # type: ignore[no-untyped-def]
    lines = sse_lines(api_client, f"{second_api}/v1/events")
    assert next(lines) == ": stream open"
    # STREAM_KEEPALIVE_SECONDS=0.3 on api2
    assert [next(lines) for _ in range(5)] == ["", ": keep-alive", "", ": keep-alive", ""]
    lines.close()


def test_history_pages(api_client, api_server, worker) -> None:  # type: ignore[no-untyped-def]
    job = jobs.submit(api_client, {**BODY, "steps": 2})
    jobs.wait_done(api_client, job["id"])
    every = history(api_client, api_server, job["id"])
    assert [e["type"] for e in every][:2] == ["job.queued", "job.started"]
    assert all(set(e) >= {"seq", "id", "type", "timestamp", "data"} for e in every)
    page = api_client.get(
        f"{api_server}/v1/jobs/{job['id']}/events", params={"limit": 1, "after": every[0]["seq"]}
    )
    assert [e["seq"] for e in page.json()["events"]] == [every[1]["seq"]]
    assert page.json()["next_after"] == every[1]["seq"]
