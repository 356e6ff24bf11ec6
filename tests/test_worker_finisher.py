"""Finishing overlapped with the next job (workers/finisher.py), on the real system: an API, a
dispatcher and real workers on a database and a RabbitMQ vhost of this module's own, and the moto S3
server reached by the workers through a TcpProxy. Blackholing the proxy holds finished jobs in the
finisher for as long as a test needs, so nothing below depends on how fast anything runs."""

from __future__ import annotations

import hashlib
import re
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from inference_server.db import Job, JobEvent, JobOutput, make_database, make_session_factory
from inference_server.devtools.faults.proxy import TcpProxy
from inference_server.devtools.services import private_vhost
from tests.conftest import fresh_database
from tests.support import jobs
from tests.support.receiver import Receiver
from tests.support.system import Proc, start_api, start_worker
from tests.support.waiting import wait_for

BOUND = 2
BODY = {"family": "sd15", "prompt": "a quay at dawn", "width": 64, "height": 64, "steps": 2}
DENOISED = re.compile(r"job ([0-9a-f-]{36}): denoised; (\d+) of (\d+) in the finisher \(")
RECORDED = re.compile(r"job ([0-9a-f-]{36}): (\w+), recorded by the finisher")


@pytest.fixture(scope="module")
def world(system_env: dict[str, str], s3_endpoint: str, logs_dir: Path) -> Iterator[dict[str, Any]]:
    """An API and a dispatcher of this module's own; workers are started by each test."""
    import boto3

    from api.auth import create_tenant_key

    bucket = f"is-finish-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    host, port = s3_endpoint.rsplit("/", 1)[1].split(":")
    proxy = TcpProxy((host, int(port)), name="storage")
    with fresh_database("is_finish") as db_url, private_vhost("is_finish") as broker:
        env = dict(system_env, DATABASE_URL=db_url, BROKER_URL=broker, STORAGE_URL=f"s3://{bucket}/out")
        # A cold child can take long to write its first claim here; its message is not lost.
        env["LOST_MESSAGE_GRACE"] = "120"
        env["LOG_FORMAT"] = "text"  # the tests read the workers' log lines
        api, url = start_api(env, logs_dir, name="api-finish")
        dispatcher = Proc("dispatcher-finish", ["dispatcher"], dict(env, API_URL=url), logs_dir)
        engine = make_database(db_url)
        sf = make_session_factory(engine)
        with sf() as session:
            _, key = create_tenant_key(session, f"finish-{uuid.uuid4().hex[:6]}")
        http = requests.Session()
        http.headers["Authorization"] = f"Bearer {key}"
        http.base_url = url  # type: ignore[attr-defined]
        worker_env = dict(
            env,
            API_URL=url,
            S3_ENDPOINT_URL=f"http://127.0.0.1:{proxy.port}",
            FINISH_IN_FLIGHT=str(BOUND),
            STORAGE_READ_TIMEOUT="120",  # a blackholed upload waits for the heal, it does not fail
        )
        try:
            yield {"http": http, "sf": sf, "proxy": proxy, "env": worker_env, "logs": logs_dir}
        finally:
            proxy.close()
            http.close()
            for proc in (dispatcher, api):
                proc.kill(15)
            engine.dispose()


@pytest.fixture
def storage(world: dict[str, Any]) -> Iterator[TcpProxy]:
    """The workers' way to storage, healed whatever the test leaves it in."""
    proxy: TcpProxy = world["proxy"]
    proxy.heal()
    yield proxy
    proxy.heal()


def _worker(world: dict[str, Any], **extra: str) -> Proc:
    proc = start_worker(dict(world["env"], **extra), world["logs"], families="sd15")
    jobs.wait_done(world["http"], _submit(world, seed=1)["id"])  # the pipeline is loaded
    return proc


def _submit(world: dict[str, Any], seed: int, **extra: Any) -> dict[str, Any]:
    return jobs.submit(world["http"], dict(BODY, seed=seed, **extra))


def _denoised(proc: Proc) -> list[str]:
    return [m.group(1) for m in DENOISED.finditer(proc.output())]


def _wait_denoised(proc: Proc, job_ids: list[str]) -> None:
    # A recycled child loads the model again first.
    wait_for(lambda: set(job_ids) <= set(_denoised(proc)), 120, what=f"{job_ids} to be denoised")


def _rows(sf: sessionmaker[Session], ids: list[str]) -> dict[str, Job]:
    with sf() as session:
        found = session.scalars(select(Job).where(Job.id.in_(ids))).all()
        session.expunge_all()
    return {job.id: job for job in found}


def _events(sf: sessionmaker[Session], job_id: str) -> list[JobEvent]:
    with sf() as session:
        query = select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.seq)
        found = list(session.scalars(query))
        session.expunge_all()
    return found


def _outputs(sf: sessionmaker[Session], job_id: str) -> list[JobOutput]:
    with sf() as session:
        return list(session.scalars(select(JobOutput).where(JobOutput.job_id == job_id)))


def _in_flight_at_each_hand_off(log: str) -> list[int]:
    """From the child's log, in its order: how many jobs were between "denoised" and "recorded"
    just after each hand-off. A run's recorded line is written before its slot is freed and a
    hand-off's line after it took one, so this count is exact, whatever the timing."""
    counts, held = [], 0
    for line in log.splitlines():
        if DENOISED.search(line):
            held += 1
            counts.append(held)
        elif RECORDED.search(line):
            held -= 1
    return counts


def _ordered(types: list[str]) -> bool:
    """queued (again as its place in line changes) < started < progress... < succeeded, nothing
    after the terminal event."""
    pattern = r"job\.queued( job\.queued)* job\.started( job\.progress)* job\.succeeded"
    return re.fullmatch(pattern, " ".join(types)) is not None


def test_jobs_overlap_bounded_with_cancels_in_the_finisher_and_a_warm_shutdown_drains(
    world: dict[str, Any], storage: TcpProxy, receiver: Receiver
) -> None:
    proc = _worker(world)
    sf, http = world["sf"], world["http"]
    try:
        storage.blackhole()  # uploads hang: denoised jobs stay in the finisher
        hook = {"url": receiver.url}
        submitted = [_submit(world, seed=100 + i, webhook=hook) for i in range(5)]
        ids = [j["id"] for j in submitted]
        # Two jobs fill the finisher; a third denoises and waits to hand over; the rest stay queued.
        wait_for(lambda: len(_denoised(proc)) == 1 + BOUND, 60, what="the finisher to fill")
        first, second = held = _denoised(proc)[1:]
        waiting = wait_for(
            lambda: [i for i, j in _rows(sf, ids).items() if j.status == "running" and i not in held],
            60,
            what="a third job to start",
        )[0]
        wait_for(
            lambda: (j := _rows(sf, [waiting])[waiting]).progress_step == j.progress_total == 2,
            30,
            what="the third job to finish denoising",
        )
        rows = _rows(sf, ids)
        assert sorted(j.status for j in rows.values()) == ["queued"] * 2 + ["running"] * 3
        assert _denoised(proc)[1:] == [first, second]  # the third job's hand-off is held back
        # Held past the lease: the finisher's jobs keep theirs renewed (the reconciler would
        # re-queue them otherwise), and no further job is taken while the finisher is full.
        time.sleep(float(world["env"]["JOB_LEASE_SECONDS"]) * 1.5)
        rows = _rows(sf, ids)
        assert sorted(j.status for j in rows.values()) == ["queued"] * 2 + ["running"] * 3
        assert {rows[i].attempts for i in (first, second, waiting)} == {1}
        assert _denoised(proc)[1:] == [first, second]

        # A cancel during the upload, and one of a job waiting in the finisher.
        for job_id in (first, second):
            assert http.post(f"{http.base_url}/v1/jobs/{job_id}/cancel", timeout=30).status_code == 200
        storage.heal()
        done = {i: jobs.wait_done(http, i) for i in ids}
        assert done[first]["status"] == done[second]["status"] == "canceled"
        assert _outputs(sf, second) == []  # known canceled before its upload: never uploaded
        succeeded = [i for i in ids if i not in (first, second)]
        for job_id in succeeded:
            job = done[job_id]
            assert job["status"] == "succeeded", job
            seed = next(j["params"]["seed"] for j in submitted if j["id"] == job_id)
            (output,) = job["outputs"]
            assert output["seed"] == seed
            assert output["sha256"] == hashlib.sha256(jobs.output_bytes(http, job_id, 0).content).hexdigest()
            assert job["attempts"] == 1
            assert job["progress"]["step"] == job["progress"]["total_steps"] == 2
            assert _ordered([e.type for e in _events(sf, job_id)]), [e.type for e in _events(sf, job_id)]
        for job_id in (first, second):
            assert [e.type for e in _events(sf, job_id)][-1] == "job.canceled"
            assert "job.succeeded" not in [e.type for e in _events(sf, job_id)]
        wait_for(
            lambda: (
                all("job.succeeded" in receiver.types(i) for i in succeeded)
                and all("job.canceled" in receiver.types(i) for i in (first, second))
            ),
            60,
            what="the terminal webhooks",
        )
        for job_id in succeeded:
            assert _ordered(receiver.types(job_id)), receiver.types(job_id)
        for job_id in (first, second):
            assert "job.succeeded" not in receiver.types(job_id)

        counts = _in_flight_at_each_hand_off(proc.output())
        assert max(counts) == BOUND and all(c <= BOUND for c in counts), counts

        # A warm shutdown with a job in the finisher: the child finishes it before it exits.
        storage.blackhole()
        last = _submit(world, seed=200)["id"]
        _wait_denoised(proc, [last])
        proc.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: "finishing 1 job(s) before the child exits" in proc.output(), 30, what="the drain")
        assert _rows(sf, [last])[last].status == "running"
        storage.heal()
        assert proc.proc.wait(60) == 0, proc.tail()
        job = _rows(sf, [last])[last]
        assert (job.status, job.attempts) == ("succeeded", 1)
    finally:
        proc.kill(9)


def test_a_recycled_child_finishes_its_jobs_before_it_exits(world: dict[str, Any], storage: TcpProxy) -> None:
    proc = _worker(world, WORKER_MAX_JOBS_PER_CHILD="1")
    try:
        storage.blackhole()
        job_id = _submit(world, seed=300)["id"]
        _wait_denoised(proc, [job_id])
        wait_for(lambda: "finishing 1 job(s) before the child exits" in proc.output(), 30, what="the drain")
        storage.heal()
        done = jobs.wait_done(world["http"], job_id)
        assert (done["status"], done["attempts"]) == ("succeeded", 1)  # not left to its lease
    finally:
        proc.kill(9)


def test_a_worker_killed_with_jobs_in_the_finisher_loses_none(
    world: dict[str, Any], storage: TcpProxy
) -> None:
    proc = _worker(world)
    sf = world["sf"]
    try:
        storage.blackhole()
        ids = [_submit(world, seed=400 + i)["id"] for i in range(BOUND)]
        _wait_denoised(proc, ids)
        assert {j.status for j in _rows(sf, ids).values()} == {"running"}
        proc.kill(signal.SIGKILL)  # the whole worker, its child and the finisher's thread with it
    finally:
        proc.kill(9)
        storage.heal()
    replacement = start_worker(world["env"], world["logs"], families="sd15")
    try:
        # The leases expire, the reconciler queues the jobs again, the new worker runs them.
        for job_id in ids:
            done = jobs.wait_done(world["http"], job_id, timeout=120)
            assert (done["status"], done["attempts"]) == ("succeeded", 2), done
            types = [e.type for e in _events(sf, job_id)]
            assert types.count("job.succeeded") == 1 and types[-1] == "job.succeeded", types
            assert len(_outputs(sf, job_id)) == 1
    finally:
        replacement.kill(15)
