"""What one rate-limit check costs a request: ``api.ratelimit.RateLimiter.check`` on the process's
memory and on Redis (keys under a prefix of this run's own, deleted afterwards), many tenants
each well under their limit, as on a busy API. Prints the median and p99 microseconds per check.

    python benchmarks/ratelimit.py [--checks 5000] [--redis redis://127.0.0.1:6379/0]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from api.ratelimit import LimitStore, RateLimiter  # noqa: E402


async def measure(url: str, checks: int, prefix: str) -> list[float]:
    limiter = RateLimiter(10**6, LimitStore(url, key_prefix=prefix), name="bench")
    tenants = [uuid.uuid4().hex for _ in range(100)]
    times = []
    for n in range(checks):
        start = time.perf_counter()
        await limiter.check(tenants[n % len(tenants)])
        times.append((time.perf_counter() - start) * 1e6)
    return times


def report(name: str, times: list[float]) -> None:
    times = sorted(times)
    p99 = times[int(len(times) * 0.99) - 1]
    print(f"{name:<8} median {statistics.median(times):8.1f} us   p99 {p99:8.1f} us   ({len(times)} checks)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checks", type=int, default=5000)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    opts = parser.parse_args()
    prefix = f"is-bench-{uuid.uuid4().hex[:8]}"
    report("memory", asyncio.run(measure("memory://", opts.checks, prefix)))
    try:
        report("redis", asyncio.run(measure(opts.redis, opts.checks, prefix)))
    finally:
        import redis

        client = redis.Redis.from_url(opts.redis)
        for key in client.scan_iter(match=f"{prefix}*"):
            client.delete(key)


if __name__ == "__main__":
    main()
