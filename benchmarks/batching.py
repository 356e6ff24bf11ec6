"""Cross-request batching: throughput of N compatible tiny SD 1.5 jobs through the whole system
(API, PostgreSQL, RabbitMQ, one worker, S3 on a moto server) with batching off and on, at each
size, against the same batches run in-process (``Engine.generate_batch``, the rate batching can
reach at best); and the latency of a lone job with batching on and off (goal: the difference at
most ``batch_wait_ms``).

    python benchmarks/batching.py [--jobs 32] [--sizes 64,256] [--max-batch 4] [--wait-ms 50] [--steps 6]

Goals (issue 11): batching on >= 2.5x off at 64x64; on >= 0.9 of the in-process batched rate at
both sizes. Throughput counts from the first job's start to the last job's end (job timestamps),
with every job submitted before the first starts (the worker is held on a warm-up job meanwhile)."""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._cpu import CpuWindow  # noqa: E402
from benchmarks._system import (  # noqa: E402
    api_and_worker,
    broker,
    database,
    free_port,
    moto_s3,
    system_env,
    tiny_models,
)
from inference_server.devtools.registry_edit import with_family_keys  # noqa: E402

TERMINAL = ("succeeded", "failed", "canceled")


def body(size: int, steps: int, i: int) -> dict[str, Any]:
    return {
        "family": "sd15",
        "prompt": f"a lighthouse at dusk, view {i}",
        "width": size,
        "height": size,
        "steps": steps,
        "seed": 1000 + i,
    }


def _ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def wait_all(http: requests.Session, api: str, ids: list[str]) -> list[dict[str, Any]]:
    done = []
    for job_id in ids:
        while True:
            job = http.get(f"{api}/v1/jobs/{job_id}", params={"wait": 30}, timeout=60).json()
            if job["status"] in TERMINAL:
                break
        if job["status"] != "succeeded":
            raise RuntimeError(f"job failed: {job}")
        done.append(job)
    return done


def submit(http: requests.Session, api: str, payload: dict[str, Any]) -> str:
    resp = http.post(f"{api}/v1/jobs", json=payload, timeout=60)
    resp.raise_for_status()
    return str(resp.json()["id"])


def throughput(
    http: requests.Session, api: str, size: int, steps: int, jobs: int, cpu: CpuWindow | None = None
) -> tuple[float, float]:
    """Jobs per second of ``jobs`` jobs queued together, and their mean batch size. ``cpu``: timed
    from the holding job's end to the last job's."""
    # A long job first holds the worker while the others are queued, so all of them wait together.
    hold = submit(http, api, {**body(size, steps, -1), "steps": 40})
    with ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(lambda i: submit(http, api, body(size, steps, i)), range(jobs)))
    wait_all(http, api, [hold])
    if cpu is not None:
        cpu.start()
    done = wait_all(http, api, ids)
    if cpu is not None:
        cpu.stop()
    first = min(_ts(j["started_at"]) for j in done)
    last = max(_ts(j["finished_at"]) for j in done)
    sizes = [(j["batch"] or {"size": 1})["size"] for j in done]
    return jobs / (last - first), statistics.mean(sizes)


def lone_latency(http: requests.Session, api: str, size: int, steps: int, runs: int = 5) -> float:
    """Median submit-to-seen time of one job with nothing else queued."""
    times = []
    for i in range(runs):
        t = time.perf_counter()
        payload = body(size, steps, 500 + i)
        job = http.post(f"{api}/v1/jobs", json=payload, headers={"Prefer": "wait=30"}, timeout=60)
        wait_all(http, api, [job.json()["id"]])
        times.append(time.perf_counter() - t)
    return statistics.median(times)


class InProcess:
    """The same jobs in this process, on a warm engine: one image per call, and ``max_batch`` jobs
    per call (``Engine.generate_batch``). Calls alternate, so both rates come from the same
    minutes of a host whose speed drifts; ``measure`` runs before and after the system's runs."""

    def __init__(self, models: Path, sizes: list[int], steps: int, max_batch: int) -> None:
        import torch

        torch.set_num_threads(1)
        from inference_server.engine.runner import Engine
        from inference_server.registry import load_registry

        self.engine = Engine(load_registry(models), device="cpu")
        self.steps, self.max_batch = steps, max_batch
        self.times: dict[int, tuple[list[float], list[float]]] = {size: ([], []) for size in sizes}

    def request(self, size: int, i: int) -> Any:
        from inference_server.engine.runner import GenerationRequest

        b = body(size, self.steps, i)
        return GenerationRequest(
            family="sd15", model=None, task="txt2img", prompt=b["prompt"], negative_prompt=None,
            width=size, height=size, steps=self.steps, guidance_scale=None, seeds=[b["seed"]],
        )  # fmt: skip

    def measure(self, rounds: int) -> None:
        for size, (alone, together) in self.times.items():
            batch = [self.request(size, i) for i in range(self.max_batch)]
            self.engine.generate(batch[0])  # loaded and warm
            for _ in range(rounds):
                t = time.perf_counter()
                self.engine.generate(batch[0])
                alone.append(time.perf_counter() - t)
                t = time.perf_counter()
                self.engine.generate_batch(batch, [None] * self.max_batch)
                together.append(time.perf_counter() - t)

    def rates(self, size: int) -> tuple[float, float]:
        """Jobs per second alone and batched (medians)."""
        alone, together = self.times[size]
        return 1 / statistics.median(alone), self.max_batch / statistics.median(together)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5, help="in-process calls of each kind, twice")
    parser.add_argument("--sizes", default="64,256")
    parser.add_argument("--max-batch", type=int, default=4)
    parser.add_argument("--wait-ms", type=int, default=50)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--cpu", action="store_true", help="also print each process's CPU per job")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    tiny = tiny_models()
    modes = {
        "off": with_family_keys(tiny, "sd15", "models-batching-off.toml", max_batch=1),
        "on": with_family_keys(
            tiny,
            "sd15",
            "models-batching-on.toml",
            max_batch=args.max_batch,
            batch_wait_ms=args.wait_ms,
            batch_max_pixels=max(sizes) ** 2,
        ),
    }
    local = InProcess(modes["on"], sizes, args.steps, args.max_batch)
    local.measure(args.rounds)
    rates: dict[tuple[str, int], tuple[float, float]] = {}
    lone: dict[tuple[str, int], float] = {}
    cpu: dict[tuple[str, int], CpuWindow | None] = {}
    logs = Path(tempfile.mkdtemp(prefix="bench-batching-"))
    with database() as db, broker() as broker_url, moto_s3() as s3:
        for mode, models in modes.items():
            port = free_port()
            api = f"http://127.0.0.1:{port}"
            env = system_env(
                db, broker_url, api, logs / mode, models,
                STORAGE_URL="s3://bench/out", S3_ENDPOINT_URL=s3, AWS_ACCESS_KEY_ID="x",
                AWS_SECRET_ACCESS_KEY="x", AWS_DEFAULT_REGION="us-east-1",
            )  # fmt: skip
            (logs / mode).mkdir()
            with api_and_worker(env, logs / mode, port, db) as http:
                for size in sizes:
                    lone[mode, size] = lone_latency(http, api, size, args.steps)
                    window = cpu[mode, size] = CpuWindow() if args.cpu else None
                    rates[mode, size] = throughput(http, api, size, args.steps, args.jobs, window)
    local.measure(args.rounds)
    print(
        f"{args.jobs} jobs of tiny sd15, {args.steps} steps; "
        f"max_batch {args.max_batch}, batch_wait_ms {args.wait_ms}"
    )
    print(f"{'size':>7} {'in-process 1':>13} {'in-process B':>13} {'system off':>11} {'system on':>10} "
          f"{'mean batch':>10} {'on/off':>7} {'on/in-proc B':>12} {'lone on-off':>12}")  # fmt: skip
    for size in sizes:
        one, batched = local.rates(size)
        off, _ = rates["off", size]
        on, mean = rates["on", size]
        extra = (lone["on", size] - lone["off", size]) * 1000
        print(
            f"{size:>4}px {one:>10.2f}/s {batched:>10.2f}/s {off:>8.2f}/s {on:>7.2f}/s {mean:>10.2f} "
            f"{on / off:>7.2f} {on / batched:>12.2f} {extra:>9.0f} ms"
        )
    print("goals: on/off >= 2.5 at 64px; on/in-proc B >= 0.9 at every size; lone on-off <= batch_wait_ms")
    for (mode, size), window in cpu.items():
        if window is not None:
            lines = window.report(args.jobs)
            print(f"\nbatching {mode}, {size}px. " + "\n".join(lines))


if __name__ == "__main__":
    main()
