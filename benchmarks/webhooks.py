"""Webhook throughput: deliveries per second from one dispatcher to a local receiver that answers at once.

Seeds N jobs with one terminal event each on a scratch PostgreSQL database, starts a receiver in its
own process (so it does not share the dispatcher's interpreter lock), runs one ``Dispatcher`` until
every delivery is acknowledged, and reports deliveries/s end to end (fan-out, claim, signed POST,
result recorded). Each delivery is checked afterwards: all ``succeeded``, each event id received once.
Goal: 500/s or more on this machine.

``--progress-jobs M`` measures fan-out instead: M running jobs report progress (interleaved, as
many GPUs would) to a receiver that is down; reports events fanned out per second and how many
delivery rows remain (coalescing keeps it near one progress row per job).

    python benchmarks/webhooks.py [--events 3000] [--concurrency 32] [--progress-jobs 0] [--json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import threading
import time
import uuid
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def add_tenant(s: Any) -> Any:
    """A tenant with a fresh webhook secret."""
    from inference_server.db import Tenant
    from webhooks.secrets import new_secret

    tenant = Tenant(name=f"bench-{uuid.uuid4().hex[:8]}", webhook_secret=new_secret())
    s.add(tenant)
    s.flush()
    return tenant


def make_settings(db_url: str, **overrides: Any) -> Any:
    """The dispatcher's settings: loopback receivers allowed, short timeouts, no broker."""
    from inference_server.settings import Settings

    values: dict[str, Any] = {
        "database_url": db_url,
        "broker_url": "memory://",
        "allow_private_networks": True,
        "webhook_retry_delays": [0.05, 0.05, 0.05],
        "webhook_timeout": 5.0,
        "webhook_concurrency": 8,
        "webhook_poll_interval": 0.02,
    }
    return Settings(**{**values, **overrides})


def insert_jobs(s: Any, tenant_id: str, url: str, count: int, *, status: str, params: dict) -> list[str]:
    """``count`` jobs of one tenant whose webhook goes to ``url``; returns their ids."""
    from sqlalchemy import insert

    from inference_server.db import Job

    ids = [str(uuid.uuid4()) for _ in range(count)]
    s.execute(
        insert(Job),
        [
            {
                "id": i,
                "tenant_id": tenant_id,
                "status": status,
                "family": "sd15",
                "task": "txt2img",
                "params": params,
                "webhook_url": url,
            }
            for i in ids
        ],
    )
    return ids


def insert_events(s: Any, tenant_id: str, type_: str, rows: list[tuple[str, dict]]) -> None:
    """One event of ``type_`` per (job id, webhook data) pair, in order."""
    from sqlalchemy import insert

    from inference_server.db import JobEvent
    from inference_server.db.base import utcnow

    now = utcnow()
    s.execute(
        insert(JobEvent),
        [
            {
                "id": f"msg_{uuid.uuid4().hex}",
                "job_id": job_id,
                "tenant_id": tenant_id,
                "type": type_,
                "payload": {"type": type_, "timestamp": now.isoformat(), "data": data},
                "created_at": now,
            }
            for job_id, data in rows
        ],
    )


def receiver_process(port_out: Any, count: Any, ids_path: str) -> None:
    """A keep-alive HTTP/1.1 receiver answering 204 at once; writes the ids it saw at exit."""
    import http.server
    import signal

    seen: list[str] = []
    lock = threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            with lock:
                seen.append(self.headers["webhook-id"])
            with count.get_lock():
                count.value += 1
            self.send_response_only(204)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    port_out.value = server.server_address[1]

    def finish(*_: object) -> None:
        with open(ids_path, "w") as f:
            f.write("\n".join(seen))
        os._exit(0)

    signal.signal(signal.SIGTERM, finish)
    server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--progress-jobs", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.progress_jobs:
        fanout_benchmark(args)
        return

    from sqlalchemy import func, select

    from inference_server.db import make_database, make_session_factory
    from inference_server.devtools.services import fresh_database
    from webhooks.dispatcher import Dispatcher
    from webhooks.tables import WebhookDelivery

    port, count = mp.Value("i", 0), mp.Value("i", 0)
    ids_path = f"/tmp/webhook-bench-{os.getpid()}.ids"
    rx = mp.Process(target=receiver_process, args=(port, count, ids_path), daemon=True)
    rx.start()
    while not port.value:
        time.sleep(0.01)
    url = f"http://127.0.0.1:{port.value}/hook"

    scratch = fresh_database("webhooks_bench")
    db_url = scratch.__enter__()
    engine = make_database(db_url, pool_size=5)
    sf = make_session_factory(engine)
    try:
        with sf() as s, s.begin():
            tenant = add_tenant(s)
            ids = insert_jobs(s, tenant.id, url, args.events, status="succeeded", params={"prompt": "x"})
            data = [(i, {"id": i, "status": "succeeded", "outputs": [{"url": "x" * 80}]}) for i in ids]
            insert_events(s, tenant.id, "job.succeeded", data)
        settings = make_settings(db_url, webhook_concurrency=args.concurrency, webhook_poll_interval=0.05)
        dispatcher = Dispatcher(settings, sf)
        stop = threading.Event()
        thread = threading.Thread(target=dispatcher.run, args=(stop,))
        t0, cpu0 = time.perf_counter(), time.process_time()
        thread.start()
        while count.value < args.events:
            time.sleep(0.005)
        received_s = time.perf_counter() - t0
        cpu_s = time.process_time() - cpu0
        stop.set()
        thread.join()
        dispatcher.close()
        with sf() as s:
            statuses = dict(
                s.execute(select(WebhookDelivery.status, func.count()).group_by(WebhookDelivery.status)).all()
            )
        rx.terminate()
        rx.join()
        with open(ids_path) as f:
            ids = f.read().split()
        os.unlink(ids_path)
    finally:
        engine.dispose()
        scratch.__exit__(None, None, None)
    result = {
        "events": args.events,
        "concurrency": args.concurrency,
        "seconds": round(received_s, 3),
        "dispatcher_cpu_seconds": round(cpu_s, 3),
        "deliveries_per_second": round(args.events / received_s, 1),
        "statuses": statuses,
        "received": len(ids),
        "unique_ids": len(set(ids)),
    }
    ok = statuses == {"succeeded": args.events} and len(set(ids)) == len(ids) == args.events
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{args.events} deliveries in {received_s:.2f} s: {result['deliveries_per_second']} deliveries/s "
            f"(concurrency {args.concurrency}, dispatcher CPU {cpu_s:.2f} s = "
            f"{1000 * cpu_s / args.events:.2f} ms per delivery); all succeeded once: {ok}"
        )
    if not ok:
        raise SystemExit(f"inconsistent result: {result}")


def fanout_benchmark(args: argparse.Namespace) -> None:
    """Progress events of many jobs, interleaved, fanned out towards a dead receiver."""
    from sqlalchemy import func, select

    from inference_server.db import make_database, make_session_factory
    from inference_server.devtools.services import fresh_database
    from webhooks.dispatcher import Dispatcher
    from webhooks.fanout import fan_out
    from webhooks.tables import WebhookDelivery

    scratch = fresh_database("webhooks_bench_fanout")
    db_url = scratch.__enter__()
    engine = make_database(db_url, pool_size=5)
    sf = make_session_factory(engine)
    dead = "http://127.0.0.1:9/hook"  # the discard port: nothing listens
    try:
        with sf() as s, s.begin():
            tenant = add_tenant(s)
            ids = insert_jobs(s, tenant.id, dead, args.progress_jobs, status="running", params={})
            steps = range(args.events // args.progress_jobs)
            insert_events(
                s, tenant.id, "job.progress", [(i, {"id": i, "step": k}) for k in steps for i in ids]
            )
        dispatcher = Dispatcher(make_settings(db_url, webhook_retry_delays=[3600.0]), sf)
        t0 = time.perf_counter()
        total = 0
        while True:
            with dispatcher._transaction() as session:
                taken = fan_out(session, batch_size=dispatcher.batch_size)
            total += taken
            if not taken:
                break
        seconds = time.perf_counter() - t0
        dispatcher.close()
        with sf() as s:
            statuses = dict(
                s.execute(select(WebhookDelivery.status, func.count()).group_by(WebhookDelivery.status)).all()
            )
    finally:
        engine.dispose()
        scratch.__exit__(None, None, None)
    result = {
        "events": total,
        "jobs": args.progress_jobs,
        "seconds": round(seconds, 3),
        "events_per_second": round(total / seconds, 1),
        "rows": statuses,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"fan-out of {total} progress events of {args.progress_jobs} jobs in {seconds:.2f} s: "
            f"{result['events_per_second']} events/s; delivery rows by status: {statuses}"
        )


if __name__ == "__main__":
    main()
