"""Event streams: what idle SSE streams cost one API process, and how soon an event reaches a client.

    python benchmarks/streams.py [--streams 1000] [--submits 300] [--jobs 6]

(a) Opens ``--streams`` idle SSE streams on one API process (one per queued job, no worker running,
    from an asyncio client in this process) and reports the API's resident memory and its submit
    latency (p50/p99 over ``--submits`` sequential submits) before and with the streams open.
    Goal: 1,000 streams in at most 200 MB, and no effect on submit latency.
(b) Starts an sd15 worker and follows ``--jobs`` tiny jobs over SSE. Latency of an event = the time
    the client reads it minus the event's ``timestamp``, which the writer takes as it builds the row,
    just before its transaction commits (one machine, one clock). That is the path from a committed
    event to the client: NOTIFY, the API's read, the stream. It is not the time from the pipeline's
    step: the worker saves progress from a side thread at most every PROGRESS_INTERVAL (0.5 s by
    default, 0.1 s here for more samples), so a step waits up to that long before it becomes an
    event at all, by design.
    Goal: p50 under 50 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._system import (  # noqa: E402
    broker,
    create_key,
    database,
    free_port,
    start,
    tiny_models,
    wait_http,
    wait_worker,
)

BODY = {"family": "sd15", "prompt": "a lighthouse at dusk", "width": 64, "height": 64, "steps": 4}
LONG = {"family": "sd15", "prompt": "a lighthouse at dusk", "width": 128, "height": 128, "steps": 40}


def cpu_seconds(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def submit_latencies(http: httpx.AsyncClient, api: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        resp = await http.post(f"{api}/v1/jobs", json=BODY)
        assert resp.status_code == 202, resp.text
        out.append((time.perf_counter() - t) * 1000)
    return out


async def hold_stream(http: httpx.AsyncClient, url: str, opened: asyncio.Event, stop: asyncio.Event) -> None:
    async with http.stream("GET", url, headers={"Accept": "text/event-stream"}) as resp:
        assert resp.status_code == 200
        lines = resp.aiter_lines()
        await anext(lines)  # ": stream open"
        opened.set()
        reader = asyncio.ensure_future(anext(lines))
        await stop.wait()
        reader.cancel()


async def idle_streams(api: str, key: str, pid: int, streams: int, submits: int) -> None:
    api_proc = psutil.Process(pid)
    limits = httpx.Limits(max_connections=streams + 20, max_keepalive_connections=streams + 20)
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=60) as http:
        async with httpx.AsyncClient(headers=headers, timeout=60) as submitter:
            await submit_latencies(submitter, api, 30)  # warm-up
            cpu = cpu_seconds(api_proc)
            before = await submit_latencies(submitter, api, submits)
            cpu_before = (cpu_seconds(api_proc) - cpu) / submits
        rss_before = api_proc.memory_info().rss / 2**20
        job_ids = [(await http.post(f"{api}/v1/jobs", json=BODY)).json()["id"] for _ in range(streams)]
        stop = asyncio.Event()
        opened = [asyncio.Event() for _ in job_ids]
        t = time.perf_counter()
        tasks = [
            asyncio.create_task(hold_stream(http, f"{api}/v1/jobs/{j}/events", o, stop))
            for j, o in zip(job_ids, opened, strict=True)
        ]
        await asyncio.wait_for(asyncio.gather(*(o.wait() for o in opened)), 300)
        open_s = time.perf_counter() - t
        await asyncio.sleep(2.0)
        rss_open = api_proc.memory_info().rss / 2**20
        # Submits on a client of their own: httpx's pool walks all its connections per request.
        async with httpx.AsyncClient(headers=headers, timeout=60) as submitter:
            cpu = cpu_seconds(api_proc)
            during = await submit_latencies(submitter, api, submits)
            cpu_during = (cpu_seconds(api_proc) - cpu) / submits
        cpu = cpu_seconds(api_proc)
        await asyncio.sleep(10.0)
        idle_cpu = (cpu_seconds(api_proc) - cpu) / 10.0
        rss_after = api_proc.memory_info().rss / 2**20
        threads = api_proc.num_threads()
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    print(f"(a) {streams} idle SSE streams opened in {open_s:.1f} s; API process threads: {threads}")
    print(f"    API RSS: {rss_before:.0f} MB without streams, {rss_open:.0f} MB with them open, "
          f"{rss_after:.0f} MB after {submits} more submits  (goal <= 200 MB)")  # fmt: skip
    phases = (("without streams", before, cpu_before), (f"with {streams} streams", during, cpu_during))
    for name, xs, cpu in phases:
        print(f"    submit latency {name}: p50 {pct(xs, 0.5):.1f} ms, p99 {pct(xs, 0.99):.1f} ms; "
              f"API CPU {cpu * 1000:.2f} ms per submit")  # fmt: skip
    print(f"    API CPU while {streams} streams sit idle: {idle_cpu * 100:.1f} % of a core")


async def event_latency(api: str, key: str, jobs: int) -> None:
    headers = {"Authorization": f"Bearer {key}"}
    by_type: dict[str, list[float]] = {}
    async with httpx.AsyncClient(headers=headers, timeout=120) as http:
        for _ in range(jobs):
            job = (await http.post(f"{api}/v1/jobs", json=LONG)).json()
            url = f"{api}/v1/jobs/{job['id']}/events"
            async with http.stream("GET", url, headers={"Accept": "text/event-stream"}) as resp:
                live = False
                async for line in resp.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    now = time.time()
                    body = json.loads(line[6:])
                    stamp = datetime.fromisoformat(body["timestamp"].replace("Z", "+00:00")).timestamp()
                    # job.queued came from the history (written before the stream opened); count
                    # only events that happened while the stream was live.
                    live = live or body["type"] != "job.queued"
                    if live:
                        by_type.setdefault(body["type"], []).append((now - stamp) * 1000)
                    if body["type"] in ("job.succeeded", "job.failed", "job.canceled"):
                        break
    every = [x for xs in by_type.values() for x in xs]
    print(f"(b) committed event -> SSE client, {jobs} jobs, {len(every)} events: "
          f"p50 {pct(every, 0.5):.1f} ms, "
          f"p90 {pct(every, 0.9):.1f} ms, max {max(every):.1f} ms  (goal p50 < 50 ms)")  # fmt: skip
    for name, xs in sorted(by_type.items()):
        print(f"    {name}: {len(xs)} events, p50 {statistics.median(xs):.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--submits", type=int, default=300)
    parser.add_argument("--jobs", type=int, default=6)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, 4 * args.streams + 1024))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))  # this process and the API it starts
    models = tiny_models()
    logs = Path(tempfile.mkdtemp(prefix="bench-logs-"))
    with database() as db, broker() as broker_url:
        port = free_port()
        api = f"http://127.0.0.1:{port}"
        env = dict(
            os.environ,
            DATABASE_URL=db,
            BROKER_URL=broker_url,
            STORAGE_URL=(logs / "s").as_uri(),
            MODELS_FILE=str(models),
            API_URL=api,
            INFERENCE_SERVER_HOME=str(logs),
            TORCH_THREADS="1",
            OMP_NUM_THREADS="1",
            PROGRESS_INTERVAL="0.1",  # more progress events to time in (b); each is timed the same way
        )
        procs = [start(["api", "--port", str(port)], env, logs / "api.log")]
        try:
            wait_http(f"{api}/healthz")
            key = create_key(db)
            asyncio.run(idle_streams(api, key, procs[0].pid, args.streams, args.submits))
            # The queued jobs of (a) would run first: drop them before the worker starts.
            from sqlalchemy import create_engine, text

            engine = create_engine(db)
            with engine.begin() as conn:
                conn.execute(text("UPDATE jobs SET status = 'canceled' WHERE status = 'queued'"))
            engine.dispose()
            procs.append(start(["worker", "--families", "sd15", "--device", "cpu"], env, logs / "worker.log"))
            wait_worker(logs / "worker.log")
            asyncio.run(event_latency(api, key, args.jobs))
        finally:
            for p in procs:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait()


if __name__ == "__main__":
    main()
