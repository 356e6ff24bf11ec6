"""The scheduler in the running system: a system of this module's own (its database, its RabbitMQ
vhost, an API and two CPU workers of sd15 on tiny models), so it alone decides what runs and the
worker slots it counts are known: two for sd15, with the default headroom of one message.

Queue positions fall as the jobs ahead finish, with an ETA checked against the real finish; a
high-priority job and another tenant's single job overtake a backlog; a tenant's concurrency limit
holds while others run; the fleet shows in ``GET /v1/models``; killing the scheduler's process
mid-run, or running two schedulers at once, loses no job and runs none twice."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from inference_server.db import Job, JobEvent, OutboxMessage, Tenant
from inference_server.devtools import services
from tests.conftest import BROKER, PG_ADMIN, _sessions
from tests.support.jobs import get, submit, wait_done
from tests.support.system import Proc, start_api, start_worker
from tests.support.waiting import wait_for

BODY = {"family": "sd15", "prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2}
HEADROOM = 1
WORKERS = 2  # the system's workers, one slot each
# What may start before a job the scheduler puts first: the messages already handed out when it
# arrived. That is at most every slot plus the headroom: a worker between a denoised job (being
# finished beside the next) and its next claim holds no slot, so its slot's message may be out.
HANDED_OUT = WORKERS + HEADROOM


class System:
    def __init__(self, env: dict[str, str], logs: Path, db: sessionmaker[Session]) -> None:
        self.env, self.logs, self.db = env, logs, db
        self.api, self.url = start_api(env, logs, "sched-api")
        self.workers: list[Proc] = []

    def restart_api(self) -> None:
        self.api, self.url = start_api(self.env, self.logs, "sched-api")

    def client(self, name: str, **limits: Any) -> requests.Session:
        from api.auth import create_tenant_key

        with self.db() as session:
            tenant, key = create_tenant_key(session, f"{name}-{time.monotonic_ns()}")
            for field, value in limits.items():
                setattr(tenant, field, value)
            session.commit()
        http = requests.Session()
        http.headers["Authorization"] = f"Bearer {key}"
        http.base_url = self.url  # type: ignore[attr-defined]
        http.tenant_id = tenant.id  # type: ignore[attr-defined]
        return http

    def jobs(self, ids: list[str]) -> dict[str, Any]:
        with self.db() as session:
            return {j.id: j for j in session.scalars(select(Job).where(Job.id.in_(ids)))}

    def idle(self) -> None:
        """Wait until nothing is queued or running (the previous test's leftovers canceled)."""

        def quiet() -> bool:
            with self.db() as session:
                return not session.scalar(select(func.count()).where(Job.status.in_(["queued", "running"])))

        wait_for(quiet, 120, interval=0.2, what="the queue to drain")


@pytest.fixture(scope="module")
def system(system_env: dict[str, str], logs_dir: Path, tiny_models: Path) -> Iterator[System]:
    with (
        services.fresh_database("is_sched", PG_ADMIN) as db_url,
        services.private_vhost("is_sched", BROKER) as broker_url,
        _sessions(db_url) as db,
    ):
        env = dict(
            system_env,
            DATABASE_URL=db_url,
            BROKER_URL=broker_url,
            WORKER_HEARTBEAT_INTERVAL="0.5",
            QUEUE_POSITION_INTERVAL="0.1",
            SCHEDULER_HEADROOM=str(HEADROOM),
        )
        sys_ = System(env, logs_dir, db)
        with ThreadPoolExecutor(2) as pool:  # workers take a while to start: both at once
            workers: list[Proc] = list(
                pool.map(lambda f: start_worker(env, logs_dir, f), ["sd15", "sd15,sdxl"])
            )
        sys_.workers = workers
        try:
            http = sys_.client("warm-up")
            for job in [submit(http, BODY) for _ in range(4)]:  # every worker loads its model; runs are timed
                assert wait_done(http, job["id"])["status"] == "succeeded"
            yield sys_
        finally:
            for proc in [*workers, sys_.api]:
                proc.kill(15)


def cancel(http: requests.Session, ids: list[str]) -> None:
    for job_id in ids:
        http.post(f"{http.base_url}/v1/jobs/{job_id}/cancel", timeout=30)  # type: ignore[attr-defined]


def started_between(jobs: dict[str, Any], ids: list[str], after: datetime, before: datetime) -> int:
    return sum(1 for j in ids if jobs[j].started_at and after < jobs[j].started_at < before)


def run_time(jobs: dict[str, Any]) -> float:
    times = [(j.finished_at - j.started_at).total_seconds() for j in jobs.values() if j.status == "succeeded"]
    return sum(times) / len(times)


def test_queue_position_falls_as_the_jobs_ahead_finish_and_the_eta_holds(system: System) -> None:
    system.idle()
    http = system.client("line")
    slow = {**BODY, "steps": 10}  # each place lasts a few position passes
    for job in [submit(http, slow) for _ in range(4)]:  # the run time the ETA learns from
        wait_done(http, job["id"])
    ids = [submit(http, slow)["id"] for _ in range(16)]
    last = ids[-1]
    seen: list[tuple[float, int, float | None]] = []  # (time, position, eta) while queued

    def running() -> bool:
        job = get(http, last)
        if job["status"] == "queued" and job["queue_position"] is not None:
            seen.append((time.monotonic(), job["queue_position"], job["progress"]["eta_seconds"]))
        return job["status"] != "queued"

    wait_for(running, 120, interval=0.05, what="the last job to start")
    done = wait_done(http, last)
    finished = time.monotonic()
    assert done["status"] == "succeeded" and done["queue_position"] is None
    positions = [p for _, p, _ in seen]
    assert positions[0] >= 6 and positions == sorted(positions, reverse=True), positions
    assert len(set(positions)) >= 4 and positions[-1] <= 2, positions
    # The webhook and stream side: job.queued events carry the falling position.
    with system.db() as session:
        events = session.scalars(
            select(JobEvent.payload)
            .where(JobEvent.job_id == last, JobEvent.type == "job.queued")
            .order_by(JobEvent.seq)
        ).all()
    told = [e["data"]["queue_position"] for e in events]
    assert told[0] is None and told[1:] == sorted(told[1:], reverse=True) and len(told) >= 4, told
    # The ETA when first placed, against when the job really finished (docs/scheduling.md).
    at, _, eta = next(s for s in seen if s[2] is not None)
    actual = finished - at
    print(f"ETA {eta:.2f} s at first placement; finished after {actual:.2f} s")
    assert eta is not None and actual / 3 <= eta <= actual * 3, (eta, actual)


def test_a_high_priority_job_overtakes_twenty_normal_ones(system: System) -> None:
    system.idle()
    capped = system.client("capped")
    resp = capped.post(f"{capped.base_url}/v1/jobs", json={**BODY, "priority": "high"}, timeout=30)  # type: ignore[attr-defined]
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "priority_not_allowed", resp.text
    http = system.client("vip", max_priority="high")
    normal = [submit(http, {**BODY, "steps": 10})["id"] for _ in range(20)]
    high = submit(http, {**BODY, "priority": "high"})
    assert high["priority"] == "high"
    wait_for(lambda: get(http, high["id"])["status"] != "queued", 60, what="the high job to start")
    cancel(http, normal)
    jobs = system.jobs([*normal, high["id"]])
    job = jobs[high["id"]]
    # Ahead of it only the messages already handed out when it arrived (HANDED_OUT).
    overtaken = started_between(jobs, normal, job.created_at, job.started_at)
    assert overtaken <= HANDED_OUT, overtaken
    behind = [j for j in normal if jobs[j].started_at is None or jobs[j].started_at > job.started_at]
    assert len(behind) >= 10, len(behind)  # it did overtake a line


def test_another_tenants_single_job_waits_behind_one_job_not_a_backlog(system: System) -> None:
    system.idle()
    a, b = system.client("a"), system.client("b")
    a_ids = [submit(a, BODY)["id"] for _ in range(40)]
    time.sleep(0.5)
    b_id = submit(b, BODY)["id"]
    wait_for(lambda: get(b, b_id)["status"] != "queued", 60, what="B's job to start")
    cancel(a, a_ids)
    jobs = system.jobs([*a_ids, b_id])
    job = jobs[b_id]
    overtaken = started_between(jobs, a_ids, job.created_at, job.started_at)
    wait = (job.started_at - job.created_at).total_seconds() / run_time(jobs)
    print(f"B waited {wait:.2f} job-durations with 2 workers; {overtaken} of A's jobs started meanwhile")
    # Behind the messages already handed out when B's arrived (HANDED_OUT), never A's backlog:
    # the wait in job-durations is benchmarks/fairness.py's to measure.
    assert overtaken <= HANDED_OUT, overtaken


def test_a_tenant_limit_holds_while_other_tenants_run(system: System) -> None:
    system.idle()
    limited, other = system.client("limited", max_concurrent=1), system.client("other")
    c_ids = [submit(limited, BODY)["id"] for _ in range(4)]
    d_ids = [submit(other, BODY)["id"] for _ in range(4)]
    for job_id in [*c_ids, *d_ids]:
        assert wait_done(limited if job_id in c_ids else other, job_id)["status"] == "succeeded"
    jobs = system.jobs([*c_ids, *d_ids])
    spans = sorted((jobs[j].started_at, jobs[j].finished_at) for j in c_ids)
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
        assert start >= end, spans  # never two of the limited tenant's jobs at once
    overlapping = [
        d for d in d_ids if any(s < jobs[d].finished_at and jobs[d].started_at < e for s, e in spans)
    ]
    assert overlapping, "the other tenant's jobs ran while the limited tenant's did"


def test_models_shows_the_online_workers_and_their_free_gpu_memory(system: System) -> None:
    http = system.client("catalog")
    families = {f["name"]: f for f in http.get(f"{system.url}/v1/models", timeout=10).json()["families"]}
    sd15, sdxl = families["sd15"], families["sdxl"]
    assert len(sd15["workers"]) == 2 and len(sdxl["workers"]) == 1
    for worker in sd15["workers"]:
        assert worker["device"] == "cpu" and worker["slots"] == 1
        assert worker["gpu_memory_free"] is None and worker["gpu_memory_total"] is None  # a CPU
    assert sd15["gpu_memory_free"] is None and families["flux"]["workers"] == []


def _ran_once(system: System, ids: list[str]) -> None:
    with system.db() as session:
        rows = session.execute(select(Job.id, Job.status, Job.attempts).where(Job.id.in_(ids))).all()
        assert {(status, attempts) for _, status, attempts in rows} == {("succeeded", 1)}, rows
        succeeded = session.execute(
            select(JobEvent.job_id, func.count())
            .where(JobEvent.job_id.in_(ids), JobEvent.type == "job.succeeded")
            .group_by(JobEvent.job_id)
        ).all()
        assert len(succeeded) == len(ids) and {n for _, n in succeeded} == {1}


def test_the_scheduler_killed_mid_run_loses_nothing(system: System) -> None:
    system.idle()
    http = system.client("killed")
    ids = [submit(http, BODY)["id"] for _ in range(24)]

    def some_done() -> bool:
        return sum(1 for j in system.jobs(ids).values() if j.status == "succeeded") >= 4

    wait_for(some_done, 60, interval=0.1, what="a few jobs to finish")
    system.api.kill(9)  # the only scheduler, in the middle of handing jobs out
    with system.db() as session:
        waiting = session.scalar(
            select(func.count()).where(OutboxMessage.job_id.in_(ids), OutboxMessage.published_at.is_(None))
        )
    assert waiting and waiting > 5  # the rest of the line is in the database, not in the broker
    system.restart_api()
    http.base_url = system.url  # type: ignore[attr-defined]
    for job_id in ids:
        wait_done(http, job_id)
    _ran_once(system, ids)


def test_two_schedulers_at_once_hand_out_every_job_once(system: System) -> None:
    system.idle()
    second, url = start_api(system.env, system.logs, "sched-api-2")
    try:
        first = system.client("two")
        other = requests.Session()
        other.headers.update(first.headers)
        other.base_url = url  # type: ignore[attr-defined]
        ids = [submit(first if i % 2 else other, BODY)["id"] for i in range(30)]
        for job_id in ids:
            wait_done(first, job_id)
    finally:
        second.kill(15)
    _ran_once(system, ids)
    # And no job was handed out twice: each message reached a worker once.
    logs = "".join(w.output() for w in system.workers)
    received = {job_id: logs.count(f"run_job[{job_id}] received") for job_id in ids}
    assert set(received.values()) == {1}, received


def test_tenants_set_changes_the_limits(system: System, tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    from tests.support.system import ROOT

    http = system.client("cli")
    with system.db() as session:
        name = session.get(Tenant, http.tenant_id).name  # type: ignore[attr-defined, union-attr]
    command = [sys.executable, "-m", "inference_server.cli.main", "tenants", "set", "--tenant", name]
    out = subprocess.run(
        [*command, "--max-priority", "high", "--max-concurrent", "3"],
        env=system.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    shown = json.loads(out.stdout)
    assert shown["tenant"] == name
    assert {k: shown["limits"][k] for k in ("max_priority", "max_concurrent")} == {
        "max_priority": "high",
        "max_concurrent": 3,
    }
    missing = subprocess.run(
        [*command[:-1], "nobody", "--max-concurrent", "1"],
        env=system.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 1 and "tenant_not_found" in missing.stderr
