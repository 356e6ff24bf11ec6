"""GPU duty: how much of a worker's wall time is its pipeline's. One worker, a full queue of N tiny
SD 1.5 jobs (256x256, 6 steps), outputs uploaded to a moto S3 server reached through a TCP proxy
that adds a round trip per request (``--storage-delay-ms``, 40 as from a GPU cloud to object storage,
then 0), and the same pipeline call timed in this process in the same run:

    efficiency = N x in-process call / (last job's finished_at - first job's started_at)

Goal: at least 0.97 at both delays. ``--finish-in-flight 0`` shows the worker without overlapped
finishing (each job encoded, uploaded and recorded before the next one starts).

Also printed, ``duty`` = the worker's own claim-to-denoised times summed over the same wall: the
share of the wall a GPU would be busy. Both sides are measured in the same minutes by the same
process, so it holds on a loaded machine where the in-process call drifts; on a CPU, unlike a GPU,
finishing the previous job takes CPU from the denoising beside it, which ``efficiency`` counts.

    python benchmarks/duty.py [--n 24] [--rounds 3] [--size 256] [--steps 6] [--storage-delay-ms 40 0]

The in-process calls run while the system is idle, before and after each round, one torch thread
in both, so the two sides see the same machine; each delay gets ``--rounds`` rounds, and the
figures printed are their medians, with the lowest and highest efficiency beside (a shared
machine's noise shows there). ``--claim-ahead off`` shows the worker claiming each job as its task
starts rather than during the previous job's last step. Timestamps are the database's."""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._cpu import CpuWindow  # noqa: E402
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
from inference_server.devtools.faults.proxy import TcpProxy  # noqa: E402

TERMINAL = ("succeeded", "failed", "canceled")
DENOISED = re.compile(r"denoised; .* \(([0-9.]+) s from its claim\)")


def _ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def _wait(http: requests.Session, api: str, job_id: str) -> dict:
    while True:
        try:
            job = http.get(f"{api}/v1/jobs/{job_id}", params={"wait": 30}, timeout=60).json()
        except requests.ConnectionError:  # a long poll's connection closed by the API: ask again
            continue
        if job["status"] in TERMINAL:
            if job["status"] != "succeeded":
                raise RuntimeError(f"job {job_id} ended {job['status']}: {job.get('error')}")
            return job


def _timed(call, n: int) -> list[float]:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(n):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return times


def one_round(  # type: ignore[no-untyped-def]
    http: requests.Session, api: str, body: dict, n: int, call, calls: int, log: Path, cpu: CpuWindow | None
) -> dict:
    """Queue ``n`` jobs at once and wait for all; the in-process call around it. The worker's log
    tells how long each job took from its claim to the end of its denoising. ``cpu``: timed from
    the first submit to the last job's end."""
    before = _timed(call, calls)
    seen = len(log.read_bytes())
    if cpu is not None:
        cpu.start()
    ids = [http.post(f"{api}/v1/jobs", json=dict(body, seed=i), timeout=30).json()["id"] for i in range(n)]
    done = [_wait(http, api, job_id) for job_id in ids]
    if cpu is not None:
        cpu.stop()
    after = _timed(call, calls)
    starts = sorted(_ts(j["started_at"]) for j in done)
    ends = sorted(_ts(j["finished_at"]) for j in done)
    wall = ends[-1] - starts[0]
    base = statistics.median(before + after)
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    denoise = [float(m.group(1)) for m in DENOISED.finditer(log.read_bytes()[seen:].decode(errors="replace"))]
    usual = statistics.median(gaps) if gaps else 0.0
    stalls = sorted((gap, i) for i, gap in enumerate(gaps) if gap > 2 * usual)
    return {
        "stalls": stalls,  # (gap, index of the job before it): starts more than twice the usual apart
        "call": base,
        "wall": wall,
        "per_job": wall / n,
        "start_to_start": usual,
        "last_finish": ends[-1] - starts[-1],
        "in_worker": statistics.median(denoise) if denoise else float("nan"),
        "efficiency": n * base / wall,
        "duty": sum(denoise) / wall if len(denoise) == n else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=24, help="jobs queued at once per round")
    parser.add_argument("--size", type=int, default=256, help="width and height")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--storage-delay-ms", type=float, nargs="+", default=[40.0, 0.0])
    parser.add_argument("--finish-in-flight", type=int, default=2, help="the worker's FINISH_IN_FLIGHT")
    parser.add_argument("--calls", type=int, default=5, help="in-process calls before and after each round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per storage delay")
    parser.add_argument("--claim-ahead", choices=("on", "off"), default="on", help="the worker's CLAIM_AHEAD")
    parser.add_argument("--cpu", action="store_true", help="also print each process's CPU per job")
    args = parser.parse_args()
    body = {"family": "sd15", "prompt": "a harbour in the rain", "width": args.size, "height": args.size}
    body["steps"] = args.steps
    models = tiny_models()
    logs = Path(tempfile.mkdtemp(prefix="bench-logs-"))
    results = []
    with database() as db, broker() as broker_url, moto_s3() as s3:
        host, port = s3.rsplit("/", 1)[1].split(":")
        proxy = TcpProxy((host, int(port)), name="storage")
        api_port = free_port()
        api = f"http://127.0.0.1:{api_port}"
        env = system_env(
            db,
            broker_url,
            api,
            logs,
            models,
            STORAGE_URL="s3://bench/duty",
            S3_ENDPOINT_URL=f"http://127.0.0.1:{proxy.port}",
            AWS_ACCESS_KEY_ID="x",
            AWS_SECRET_ACCESS_KEY="x",
            AWS_DEFAULT_REGION="us-east-1",
            FINISH_IN_FLIGHT=str(args.finish_in_flight),
            CLAIM_AHEAD=str(args.claim_ahead == "on").lower(),
        )
        try:
            with api_and_worker(env, logs, api_port, db) as http:
                warm = http.post(f"{api}/v1/jobs", json=dict(body, seed=0), timeout=30).json()
                params = _wait(http, api, warm["id"])["params"]
                call = pipeline_call(models, params)  # the very call the worker made
                for delay in args.storage_delay_ms:
                    proxy.slow(delay / 1000)
                    _wait(
                        http,
                        api,
                        http.post(f"{api}/v1/jobs", json=dict(body, seed=0), timeout=30).json()["id"],
                    )
                    windows = [CpuWindow() if args.cpu else None for _ in range(args.rounds)]
                    rounds = [
                        one_round(http, api, body, args.n, call, args.calls, logs / "worker.log", window)
                        for window in windows
                    ]
                    results.append((delay, rounds, windows))
        finally:
            proxy.close()
    print(
        f"sd15 {args.size}x{args.size}, {args.steps} steps, {args.n} jobs per round, {args.rounds} rounds, "
        f"FINISH_IN_FLIGHT={args.finish_in_flight}, CLAIM_AHEAD={args.claim_ahead}, one torch thread"
    )
    columns = ("storage delay", "in-process call", "claim->denoised", "start->start", "last finish")
    print("  ".join(f"{c:>15}" for c in columns) + "  efficiency (lowest-highest)  duty")
    for delay, rounds, _ in results:
        r = {key: statistics.median(one[key] for one in rounds) for key in rounds[0] if key != "stalls"}
        cells = [delay / 1000, r["call"], r["in_worker"], r["start_to_start"], r["last_finish"]]
        spread = [one["efficiency"] for one in rounds]
        print(
            "  ".join(f"{v * 1000:12.1f} ms" for v in cells)
            + f"  {r['efficiency']:10.3f} ({min(spread):.3f}-{max(spread):.3f})  {r['duty']:.3f}"
        )
    print("goal: efficiency >= 0.97 at every delay")
    for delay, rounds, _ in results:
        for i, one in enumerate(rounds):
            if one["stalls"]:
                lost = sum(gap - one["start_to_start"] for gap, _ in one["stalls"])
                worst = ", ".join(f"{gap * 1000:.0f} ms after job {at + 1}" for gap, at in one["stalls"][-3:])
                print(
                    f"storage delay {delay:g} ms, round {i + 1}: {len(one['stalls'])} start(s) more than "
                    f"twice the usual gap after the one before, {lost * 1000:.0f} ms of the wall over "
                    f"it; longest: {worst}"
                )
    for delay, _, windows in results:
        for i, window in enumerate(windows):
            if window is not None:
                lines = window.report(args.n)
                print(f"\nstorage delay {delay:g} ms, round {i + 1}. " + "\n".join(lines))


if __name__ == "__main__":
    main()
