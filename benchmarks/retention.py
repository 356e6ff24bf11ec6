"""Retention throughput: how fast one dispatcher's pruner catches up with a backlog, and what the
chain-repair sweep costs while many deliveries wait behind dead receivers.

Seeds a scratch PostgreSQL database with old job events (no deliveries), old finished deliveries
(each with its event and three attempts) and old published outbox rows, runs ``Pruner.step`` until
it has caught up, and reports rows deleted per second and the longest batch (a batch holds its
locks that long). Then seeds ``--waiting`` waiting deliveries (three per job, behind a pending
head) and times ``chain.sweep``, which the dispatcher runs every few seconds.

    python benchmarks/retention.py [--events 50000] [--deliveries 10000] [--outbox 50000]
                                   [--waiting 30000] [--batch 500]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from datetime import timedelta

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--deliveries", type=int, default=10_000)
    parser.add_argument("--outbox", type=int, default=50_000)
    parser.add_argument("--waiting", type=int, default=30_000)
    parser.add_argument("--batch", type=int, default=500)
    args = parser.parse_args()

    from sqlalchemy import func, select
    from tests.webhook_support import add_job, add_tenant, make_settings

    from inference_server.db import JobEvent, OutboxMessage, make_database, make_session_factory
    from inference_server.db.base import utcnow
    from tests.conftest import fresh_database
    from tests.test_webhooks_retention import seed_events, seed_outbox
    from webhooks.chain import sweep
    from webhooks.retention import Pruner
    from webhooks.tables import WebhookAttempt, WebhookDelivery

    old = timedelta(days=10)
    with fresh_database("retention_bench") as url:
        engine = make_database(url)
        sf = make_session_factory(engine)
        with sf() as s, s.begin():
            job = add_job(s, add_tenant(s), "http://127.0.0.1:9/hook")
            seed_events(s, job, args.events, age=old)
            seqs = seed_events(s, job, args.deliveries, age=old, type="job.succeeded")
            at = utcnow() - old
            ids = [str(uuid.uuid4()) for _ in seqs]
            s.execute(
                WebhookDelivery.__table__.insert(),
                [
                    {
                        "id": i,
                        "event_seq": seq,
                        "event_id": f"msg_{i}",
                        "event_type": "job.succeeded",
                        "job_id": job.id,
                        "tenant_id": job.tenant_id,
                        "url": job.webhook_url,
                        "status": "succeeded",
                        "attempts": 3,
                        "retry_base": 0,
                        "created_at": at,
                        "updated_at": at,
                    }
                    for i, seq in zip(ids, seqs, strict=True)
                ],
            )
            s.execute(
                WebhookAttempt.__table__.insert(),
                [
                    {"delivery_id": i, "number": n, "started_at": at, "duration_ms": 3}
                    for i in ids
                    for n in range(3)
                ],
            )
            seed_outbox(s, job, args.outbox, published=old, age=old)
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM ANALYZE")

        settings = make_settings(url, prune_batch_size=args.batch)
        pruner = Pruner(settings, sf.begin, skip_locked=True)
        longest = 0.0
        t0 = time.perf_counter()
        while True:
            t = time.perf_counter()
            more = pruner.step(budget=0.25)
            longest = max(longest, time.perf_counter() - t)
            if not more:
                break
        seconds = time.perf_counter() - t0
        rows = args.events + 2 * args.deliveries + args.outbox
        with sf() as s:
            left = sum(s.scalar(select(func.count()).select_from(m)) or 0 for m in (JobEvent, OutboxMessage))
        print(
            f"pruned {rows} rows (+{3 * args.deliveries} attempts by cascade) in {seconds:.2f} s: "
            f"{rows / seconds:.0f} rows/s, batch size {args.batch}, longest 0.25 s turn {longest:.3f} s; "
            f"left: {left}"
        )

        with sf() as s, s.begin():
            tenant = add_tenant(s)
            jobs = [add_job(s, tenant, "http://127.0.0.1:9/hook") for _ in range(args.waiting // 3)]
            rows_w = []
            for j in jobs:
                for n, seq in enumerate(seed_events(s, j, 4, age=timedelta(0))):
                    rows_w.append(
                        {
                            "id": str(uuid.uuid4()),
                            "event_seq": seq,
                            "event_id": f"msg_{seq}",
                            "event_type": "job.progress",
                            "job_id": j.id,
                            "tenant_id": j.tenant_id,
                            "url": j.webhook_url,
                            "status": "pending" if n == 0 else "waiting",
                            "attempts": 3,
                            "retry_base": 0,
                            "next_attempt_at": utcnow() + timedelta(hours=1),
                            "created_at": at,
                            "updated_at": at,
                        }
                    )
            s.execute(WebhookDelivery.__table__.insert(), rows_w)
        with engine.connect() as conn:
            conn.exec_driver_sql("ANALYZE webhook_deliveries")
            conn.commit()
        for label, window in (("full", None), ("last 10 min", 600.0)):
            times = []
            for _ in range(5):
                with sf() as s, s.begin():
                    t = time.perf_counter()
                    repaired = sweep(s, max_age=window)
                    times.append(time.perf_counter() - t)
            print(
                f"{label} sweep with {len(rows_w) - len(jobs)} waiting deliveries ({len(jobs)} chains, "
                f"last changed days ago): median {sorted(times)[2] * 1000:.1f} ms, repaired {repaired}"
            )
        engine.dispose()


if __name__ == "__main__":
    main()
