"""Overhead of the system around the GPU: median end-to-end time of a tiny SD 1.5 job (64x64,
4 steps) through API, PostgreSQL, RabbitMQ, worker and S3 storage (moto server), divided by the
median time of the same pipeline call in-process. Goal: at most 1.2.

    python benchmarks/overhead.py [--jobs 30] [--storage s3|file]

The host's CPU speed drifts from minute to minute here, so in-process calls and jobs alternate:
both medians come from the same minutes. The client submits with `Prefer: wait`, which holds the
answer until the worker's commit notifies the API. Phases come from the job's own timestamps."""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._system import (  # noqa: E402
    api_and_worker,
    broker,
    database,
    free_port,
    moto_s3,
    pipeline_call,
    system_env,
    tiny_models,
)

BODY = {"family": "sd15", "prompt": "a lighthouse at dusk", "width": 64, "height": 64, "steps": 4, "seed": 1}


def _ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def run_job(http: requests.Session, api: str) -> tuple[float, dict]:
    t = time.perf_counter()
    # One request: the submit is held open until the job ends (Prefer: wait), as a client after
    # the lowest latency would do it.
    job = http.post(f"{api}/v1/jobs", json=BODY, headers={"Prefer": "wait=30"}, timeout=60).json()
    while job["status"] not in ("succeeded", "failed", "canceled"):
        job = http.get(f"{api}/v1/jobs/{job['id']}", params={"wait": 30}, timeout=60).json()
    elapsed = time.perf_counter() - t
    if job["status"] != "succeeded":
        raise RuntimeError(f"job failed: {job}")
    job["_seen"] = time.time()
    return elapsed, job


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=30)
    parser.add_argument(
        "--storage",
        choices=["s3", "file"],
        default="s3",
        help="s3: a moto server process over HTTP; file: local disk",
    )
    args = parser.parse_args()
    models = tiny_models()
    call = pipeline_call(models, dict(BODY, guidance_scale=7.5))
    logs = Path(tempfile.mkdtemp(prefix="bench-logs-"))
    base, e2e = [], []
    phases: dict[str, list[float]] = {"submit->started": [], "started->finished": [], "finished->seen": []}
    with database() as db, broker() as broker_url, moto_s3() as s3:
        port = free_port()
        api = f"http://127.0.0.1:{port}"
        storage = "s3://bench/out" if args.storage == "s3" else (logs / "storage").as_uri()
        env = system_env(
            db,
            broker_url,
            api,
            logs,
            models,
            STORAGE_URL=storage,
            S3_ENDPOINT_URL=s3,
            AWS_ACCESS_KEY_ID="x",
            AWS_SECRET_ACCESS_KEY="x",
            AWS_DEFAULT_REGION="us-east-1",
        )
        with api_and_worker(env, logs, port, db) as http:
            for _ in range(3):  # the worker loads the pipeline
                run_job(http, api)
            for _ in range(args.jobs):
                t = time.perf_counter()
                call()
                base.append(time.perf_counter() - t)
                elapsed, job = run_job(http, api)
                e2e.append(elapsed)
                created, started, finished = (
                    _ts(job[k]) for k in ("created_at", "started_at", "finished_at")
                )
                phases["submit->started"].append(started - created)
                phases["started->finished"].append(finished - started)
                phases["finished->seen"].append(job["_seen"] - finished)
    b, e = statistics.median(base), statistics.median(e2e)
    print(f"in-process pipeline call : median {b * 1000:7.1f} ms  (n={len(base)})")
    print(f"end-to-end through system: median {e * 1000:7.1f} ms  (n={len(e2e)}, storage {args.storage})")
    for name, values in phases.items():
        print(f"  {name:18s} median {statistics.median(values) * 1000:7.1f} ms")
    print(f"overhead: {(e - b) * 1000:.1f} ms per job; ratio {e / b:.3f}  (goal <= 1.2)")


if __name__ == "__main__":
    main()
