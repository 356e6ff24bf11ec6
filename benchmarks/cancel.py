"""How fast a cancel stops a running job: a long tiny SD job (256x256, 50 steps) is canceled
mid-run and the next job is submitted at once; the time from the cancel's answer to the next
job's start is how long the worker went on with the canceled one (plus the hand-over).

    python benchmarks/cancel.py [--runs 10]

A step of the long job is measured too: "within a step" means the first figure stays near it."""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._system import (  # noqa: E402
    api_and_worker,
    broker,
    database,
    free_port,
    system_env,
    tiny_models,
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
    stops, steps = [], []
    with database() as db, broker() as broker_url:
        port = free_port()
        api = f"http://127.0.0.1:{port}"
        env = system_env(db, broker_url, api, logs, models, STORAGE_URL=(logs / "storage").as_uri())
        with api_and_worker(env, logs, port, db) as http:
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
    print(f"one step of the long job          : {statistics.median(steps) * 1000:6.1f} ms")
    print(
        f"cancel answered -> next job started: median {statistics.median(stops) * 1000:6.1f} ms, "
        f"max {max(stops) * 1000:6.1f} ms  (n={len(stops)})"
    )


if __name__ == "__main__":
    main()
