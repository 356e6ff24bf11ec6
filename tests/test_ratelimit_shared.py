"""The rate limits shared by API replicas through Redis: two API processes on one Redis count the
same window, for a key's requests and for an address's wrong keys; a Redis that is down makes each
process count on its own (and say so) instead of failing requests.

Every key this module writes is under a prefix of its own, deleted at the end; the shared Redis is
never flushed."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from inference_server.devtools.services import free_port
from tests.support.system import Proc, start_api

REDIS = "redis://127.0.0.1:6379/0"
PER_MINUTE = 6
FAILURES_PER_MINUTE = 4


@pytest.fixture(scope="module")
def prefix() -> Iterator[str]:
    import redis

    name = f"is-test-{uuid.uuid4().hex[:10]}"
    client = redis.Redis.from_url(REDIS, socket_timeout=5)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(f"Redis is required at {REDIS}: {exc}", pytrace=False)
    yield name
    for key in client.scan_iter(match=f"{name}*"):
        client.delete(key)
    client.close()


@pytest.fixture(scope="module")
def replicas(system_env: dict[str, str], logs_dir: Path, prefix: str) -> Iterator[list[str]]:
    env = dict(
        system_env,
        RATE_LIMIT_STORAGE_URL=REDIS,
        RATE_LIMIT_KEY_PREFIX=prefix,
        RATE_LIMIT_PER_MINUTE=str(PER_MINUTE),
        AUTH_FAILURES_PER_MINUTE=str(FAILURES_PER_MINUTE),
    )
    started: list[Proc] = []
    urls = []
    for name in ("api-limit-a", "api-limit-b"):
        proc, url = start_api(env, logs_dir, name=name)
        started.append(proc)
        urls.append(url)
    yield urls
    for proc in started:
        proc.kill(15)


def test_two_replicas_share_one_window_per_key(replicas: list[str], tenant) -> None:  # type: ignore[no-untyped-def]
    auth = {"Authorization": f"Bearer {tenant.api_key}"}
    turns = itertools.cycle(replicas)
    answers = [requests.get(f"{next(turns)}/v1/jobs", headers=auth, timeout=10) for _ in range(PER_MINUTE)]
    assert [r.status_code for r in answers] == [200] * PER_MINUTE  # three on each replica
    # Per process, each replica would still allow three more; shared, both are at the limit now.
    for url in replicas:
        limited = requests.get(f"{url}/v1/jobs", headers=auth, timeout=10)
        assert limited.status_code == 429, limited.text
        assert limited.json()["error"]["code"] == "rate_limited"
        assert 1 <= int(limited.headers["Retry-After"]) <= 61  # from the window's reset time


def test_wrong_keys_from_one_address_are_counted_across_replicas(replicas: list[str], tenant) -> None:  # type: ignore[no-untyped-def]
    wrong = {"Authorization": f"Bearer isk_guess_{uuid.uuid4().hex}"}
    turns = itertools.cycle(replicas)
    answers = [
        requests.get(f"{next(turns)}/v1/models", headers=wrong, timeout=10)
        for _ in range(FAILURES_PER_MINUTE)
    ]
    assert [r.status_code for r in answers] == [401] * FAILURES_PER_MINUTE  # two on each replica
    for url in replicas:
        refused = requests.get(f"{url}/v1/models", headers=wrong, timeout=10)
        assert refused.status_code == 429, refused.text
        assert 1 <= int(refused.headers["Retry-After"]) <= 61


def test_a_redis_that_is_down_leaves_each_replica_counting_alone(
    system_env: dict[str, str], logs_dir: Path, tenant  # type: ignore[no-untyped-def]
) -> None:
    nothing_there = f"redis://127.0.0.1:{free_port()}/0"
    env = dict(system_env, RATE_LIMIT_STORAGE_URL=nothing_there, RATE_LIMIT_PER_MINUTE="3")
    proc, url = start_api(env, logs_dir, name="api-limit-no-redis")
    try:
        auth = {"Authorization": f"Bearer {tenant.api_key}"}
        codes = [requests.get(f"{url}/v1/jobs", headers=auth, timeout=10).status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]  # served, and still limited, in this process's memory
        metrics = requests.get(f"{url}/metrics", timeout=10).text
        fallbacks = [
            float(line.split()[-1])
            for line in metrics.splitlines()
            if line.startswith("inference_rate_limit_storage_errors_total")
        ]
        assert fallbacks and fallbacks[0] >= 1, metrics[-2000:]
    finally:
        proc.kill(15)
    assert "rate-limit storage" in proc.output() and "counting per process" in proc.output()
