"""The statements on the hot paths, alone: a submit's chained insert (job, outbox message, event)
and a worker's conditional transition (update, event, NOTIFY), each in its own committed
transaction on a scratch PostgreSQL database. Prints wall and client CPU medians per statement.

    python benchmarks/persist.py [--rounds 6] [--per-round 150]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import create_engine, text  # noqa: E402

from inference_server.db import Job, JobEvent, OutboxMessage, Tenant, make_database, make_session_factory  # noqa: E402
from inference_server.db.base import new_id, utcnow  # noqa: E402
from inference_server.events import event_values  # noqa: E402
from inference_server.jobs.enums import EventType  # noqa: E402
from inference_server.jobs.persist import insert_new_rows, update_with_rows  # noqa: E402
from inference_server.migrate import upgrade  # noqa: E402

ADMIN = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"


def job_values(now):  # type: ignore[no-untyped-def]
    params = {"family": "sd15", "model": "m", "task": "txt2img", "steps": 4, "seeds": [1]}
    return {
        "id": new_id(), "tenant_id": "bench", "status": "queued", "family": "sd15", "model": "m",
        "task": "txt2img", "params": params, "webhook_url": None, "webhook_events": None,
        "idempotency_key": None, "request_hash": None, "progress_step": 0, "progress_total": 4,
        "eta_seconds": None, "error_code": None, "error_message": None, "attempts": 0,
        "created_at": now, "started_at": None, "finished_at": None, "updated_at": now,
    }  # fmt: skip


def one(sf, clock):  # type: ignore[no-untyped-def]
    now = utcnow()
    job = job_values(now)
    outbox = {"job_id": job["id"], "queue": "jobs.sd15", "created_at": now, "published_at": None}
    t0 = clock()
    with sf() as session:
        queued = event_values(job, EventType.QUEUED)
        insert_new_rows(session, [(Job, job), (OutboxMessage, outbox), (JobEvent, queued)])
        session.commit()
    t1 = clock()
    changes = {"status": "succeeded", "finished_at": utcnow(), "updated_at": utcnow(), "progress_step": 4}
    event = event_values({**job, **changes}, EventType.SUCCEEDED)
    with sf() as session:
        where = {"id": job["id"], "status": "queued"}
        notify = ("bench", job["id"])
        assert update_with_rows(session, Job, where, changes, [(JobEvent, event)], notify=notify)
        session.commit()
    return t1 - t0, clock() - t1


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--per-round", type=int, default=150)
    args = parser.parse_args()
    admin = create_engine(ADMIN, isolation_level="AUTOCOMMIT")
    name = f"bench_persist_{uuid.uuid4().hex[:6]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = ADMIN.rsplit("/", 1)[0] + "/" + name
    try:
        upgrade(url)
        db = make_database(url)
        sf = make_session_factory(db)
        with sf() as session:
            session.add(Tenant(id="bench", name="bench", webhook_secret="x"))
            session.commit()
        for _ in range(50):
            one(sf, time.perf_counter)
        figures: dict[str, tuple[list[float], list[float]]] = {"wall": ([], []), "cpu": ([], [])}
        for _ in range(args.rounds):
            for label, clock in (("wall", time.perf_counter), ("cpu", time.process_time)):
                for _ in range(args.per_round):
                    submit, transition = one(sf, clock)
                    figures[label][0].append(submit)
                    figures[label][1].append(transition)
        for label, (submits, transitions) in figures.items():
            print(
                f"{label:4s} median per statement: submit {statistics.median(submits) * 1e3:.3f} ms, "
                f"transition {statistics.median(transitions) * 1e3:.3f} ms (n={len(submits)})"
            )
        db.dispose()
    finally:
        with admin.connect() as conn:
            kill = f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"
            conn.execute(text(kill))
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))


if __name__ == "__main__":
    main()
