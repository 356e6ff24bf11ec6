"""How fast a cancel stops a running job: a long tiny SD job (256x256, 50 steps) is canceled
mid-run and the next job is submitted at once; the time from the cancel's answer to the next
job's start is how long the worker went on with the canceled one (plus the hand-over).

    python benchmarks/cancel.py [--runs 10]

A step of the long job is measured too: "within a step" means the first figure stays near it."""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._system import (  # noqa: E402
    BROKER,
    create_key,
    database,
    free_port,
    purge_queues,
    start,
    tiny_models,
    wait_http,
)

LONG = {"family": "sd15", "prompt": "a slow tide", "width": 256, "height": 256, "steps": 50, "seed": 1}
NEXT = {"family": "sd15", "prompt": "the next job", "width": 64, "height": 64, "steps": 1, "seed": 2}


def _ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    models = tiny_models()
    logs = Path(tempfile.mkdtemp(prefix="bench-logs-"))
    purge_queues(["sd15"])
    stops, steps = [], []
    with database() as db:
        port = free_port()
        api = f"http://127.0.0.1:{port}"
        env = dict(
            os.environ,
            DATABASE_URL=db,
            BROKER_URL=BROKER,
            STORAGE_URL=(logs / "storage").as_uri(),
            MODELS_FILE=str(models),
            TORCH_THREADS="1",
            OMP_NUM_THREADS="1",
            API_URL=api,
            INFERENCE_SERVER_HOME=str(logs),
        )
        procs = [
            start(["api", "--port", str(port)], env, logs / "api.log"),
            start(["worker", "--families", "sd15", "--device", "cpu"], env, logs / "worker.log"),
        ]
        try:
            wait_http(f"{api}/healthz")
            http = requests.Session()
            http.headers["Authorization"] = f"Bearer {create_key(db)}"
            # Warm-up, and the length of one step of the long job.
            http.post(f"{api}/v1/jobs", json=NEXT, headers={"Prefer": "wait=60"}, timeout=90)
            full = http.post(f"{api}/v1/jobs", json=LONG, headers={"Prefer": "wait=60"}, timeout=90).json()
            step = (_ts(full["finished_at"]) - _ts(full["started_at"])) / LONG["steps"]
            for _ in range(args.runs):
                job = http.post(f"{api}/v1/jobs", json=LONG, timeout=30).json()
                while http.get(f"{api}/v1/jobs/{job['id']}", timeout=30).json()["progress"]["step"] < 5:
                    time.sleep(0.05)
                http.post(f"{api}/v1/jobs/{job['id']}/cancel", timeout=30).raise_for_status()
                canceled = time.time()
                nxt = http.post(f"{api}/v1/jobs", json=NEXT, headers={"Prefer": "wait=60"}, timeout=90).json()
                stops.append(_ts(nxt["started_at"]) - canceled)
                steps.append(step)
        finally:
            for p in procs:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait()
    print(f"one step of the long job          : {statistics.median(steps) * 1000:6.1f} ms")
    print(
        f"cancel answered -> next job started: median {statistics.median(stops) * 1000:6.1f} ms, "
        f"max {max(stops) * 1000:6.1f} ms  (n={len(stops)})"
    )


if __name__ == "__main__":
    main()
