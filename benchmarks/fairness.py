"""Fairness and ingest with the scheduler in the relay (docs/scheduling.md).

1. Fair share: tenant A submits a backlog (--jobs, 40), then tenant B submits one job. Reported:
   B's wait from submit to start, in job-durations (the median run of A's jobs), and how many of A's
   jobs started meanwhile. First come, first served, B would wait the whole backlog.
2. Ingest: jobs accepted per second by one API process with N clients and no workers (as
   benchmarks/ingest.py measures it), now that every relay pass schedules.

    python benchmarks/fairness.py [--jobs 40] [--steps 4] [--headroom 1] [--clients 16] [--seconds 10]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._system import (  # noqa: E402
    broker,
    create_key,
    database,
    free_port,
    start,
    system_env,
    tiny_models,
    wait_http,
    wait_worker,
)
from benchmarks.ingest import clients, cpu_seconds  # noqa: E402


def session(api: str, key: str) -> requests.Session:
    http = requests.Session()
    http.headers["Authorization"] = f"Bearer {key}"
    return http


def submit(http: requests.Session, api: str, body: dict[str, object]) -> str:
    resp = http.post(f"{api}/v1/jobs", json=body, timeout=30)
    resp.raise_for_status()
    return str(resp.json()["id"])


def job(http: requests.Session, api: str, job_id: str) -> dict[str, object]:
    return dict(http.get(f"{api}/v1/jobs/{job_id}", timeout=30).json())


def seconds(stamp: object) -> float:
    from datetime import datetime

    return datetime.fromisoformat(str(stamp).replace("Z", "+00:00")).timestamp()


def fair_share(api: str, db: str, args: argparse.Namespace) -> None:
    body = {"family": "sd15", "prompt": "a lighthouse", "width": 64, "height": 64, "steps": args.steps}
    a, b = session(api, create_key(db)), session(api, create_key(db))
    warm = submit(a, api, body)
    while job(a, api, warm)["status"] != "succeeded":  # the worker loads its model first
        time.sleep(0.2)
    backlog = [submit(a, api, body) for _ in range(args.jobs)]
    time.sleep(1.0)  # A's backlog is in line, some of it running
    b_id = submit(b, api, body)
    while job(b, api, b_id)["status"] not in ("succeeded", "failed"):
        time.sleep(0.05)
    for job_id in backlog:
        a.post(f"{api}/v1/jobs/{job_id}/cancel", timeout=30)
    views = [job(a, api, j) for j in backlog]
    b_view = job(b, api, b_id)
    created, started = seconds(b_view["created_at"]), seconds(b_view["started_at"])
    runs = sorted(
        seconds(v["finished_at"]) - seconds(v["started_at"]) for v in views if v["status"] == "succeeded"
    )
    run = runs[len(runs) // 2]
    overtook = sum(1 for v in views if v["started_at"] and created < seconds(v["started_at"]) < started)
    print(f"fair share: A {args.jobs} jobs, then B 1 job; 1 worker, SCHEDULER_HEADROOM={args.headroom}")
    print(f"  job duration (median of A's runs): {run * 1000:.0f} ms")
    print(f"  B waited {started - created:.2f} s = {(started - created) / run:.2f} job-durations")
    print(f"  A's jobs started between B's submit and B's start: {overtook} (FIFO: {args.jobs})")


def ingest(api: str, api_pid: int, db: str, args: argparse.Namespace) -> None:
    key = create_key(db)
    out: mp.Queue = mp.Queue()
    warm = mp.Process(target=clients, args=(api, key, args.clients, 2.0, out))
    warm.start()
    warm.join()
    out.get()
    began, cpu_before = time.perf_counter(), cpu_seconds(api_pid)
    load = mp.Process(target=clients, args=(api, key, args.clients, args.seconds, out))
    load.start()
    load.join()
    accepted, errors = out.get()
    elapsed, cpu = time.perf_counter() - began, cpu_seconds(api_pid) - cpu_before
    print(f"ingest: {args.clients} clients, {elapsed:.1f} s, no workers")
    print(f"  accepted: {accepted} jobs, errors: {errors}")
    print(f"  ingest rate: {accepted / elapsed:.0f} jobs/s  (goal >= 300)")
    print(f"  API process CPU: {cpu * 1000 / max(accepted, 1):.2f} ms per accepted job")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=40, help="tenant A's backlog")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--headroom", type=int, default=1, help="SCHEDULER_HEADROOM")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--skip-ingest", action="store_true")
    args = parser.parse_args()
    models = tiny_models()
    logs = Path(tempfile.mkdtemp(prefix="bench-fair-"))
    with database() as db, broker() as broker_url:
        port = free_port()
        api = f"http://127.0.0.1:{port}"
        env = system_env(
            db,
            broker_url,
            api,
            logs,
            models,
            STORAGE_URL=(logs / "s").as_uri(),
            SCHEDULER_HEADROOM=str(args.headroom),
            SCHEDULER_HEADROOM_PER_SLOT="0",
            WORKER_HEARTBEAT_INTERVAL="1",
        )
        api_proc = start(["api", "--port", str(port)], env, logs / "api.log")
        worker = start(["worker", "--families", "sd15", "--device", "cpu"], env, logs / "worker.log")
        try:
            wait_http(f"{api}/healthz")
            wait_worker(logs / "worker.log")
            fair_share(api, db, args)
            os.killpg(worker.pid, signal.SIGTERM)
            worker.wait()
            if not args.skip_ingest:
                ingest(api, api_proc.pid, db, args)
        finally:
            for proc in (worker, api_proc):
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait()


if __name__ == "__main__":
    main()
