"""Faults of what the system depends on: the broker and PostgreSQL restarted under load, PostgreSQL
down while jobs run, storage down or blipping, a worker cut off from its database, and an API whose
database stops answering."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import requests

from inference_server.devtools.faults.lab import Lab
from inference_server.devtools.faults.run import Run
from inference_server.devtools.faults.scenarios.kit import (
    DEPENDENCY_CODES,
    MEDIUM,
    QUICK,
    bodies,
    expect_codes,
    mid_job,
)
from inference_server.devtools.faults.tally import Tally

SMALL: dict[str, Any] = {**QUICK, "prompt": "a small boat", "width": 256, "height": 256, "steps": 10}


def _under_load(s: Run, size: int, fault: Any) -> Tally:
    """Submit ``size`` quick jobs over about ten seconds; a third of the way in, ``fault()``."""
    per_job = s.warm_up(QUICK, n=4)
    s.submit(bodies(s, QUICK, size), interval=min(0.2, 10.0 / size), wait=False)
    deadline = time.monotonic() + 60
    while len(s.accepted_ids()) < size // 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    s.mark(f"fault with {len(s.accepted_ids())} accepted")
    fault()
    s.healed()
    backlog = s.pending()
    tally = s.settle(allowance=1.5 * per_job * (backlog + size - len(s.accepted_ids())))
    tally.notes.append(f"{backlog} job(s) not terminal when the fault healed; {per_job:.2f} s per job before")
    return tally


def broker_restart(lab: Lab, size: int) -> Tally:
    """RabbitMQ stopped for a few seconds and started again while jobs are submitted and run."""
    with lab.run("broker_restart") as s:
        tally = _under_load(s, size, lambda: lab.rabbit.restart(down_for=3))
        expect_codes(tally)
        return tally


def pg_restart(lab: Lab, size: int) -> Tally:
    """PostgreSQL restarted (fast shutdown: every session cut) while jobs are submitted and run."""
    with lab.run("pg_restart") as s:
        tally = _under_load(s, size, lambda: lab.pg.restart(down_for=3))
        expect_codes(tally)
        return tally


def pg_outage(lab: Lab, size: int, *, down_for: float = 12.0) -> Tally:
    """PostgreSQL killed (SIGKILL, every process: a crash) while two workers are each mid-job, and
    started again ``down_for`` seconds later."""
    with lab.run("pg_outage") as s:
        s.warm_up()
        s.submit(bodies(s, MEDIUM, size))
        deadline = time.monotonic() + 60
        while len(s.running(min_step=2)) < min(2, size) and time.monotonic() < deadline:
            time.sleep(0.05)
        busy = len(s.running(min_step=2))
        s.mark(f"PostgreSQL killed with {busy} job(s) mid-run")
        lab.pg.kill()
        time.sleep(down_for)
        lab.pg.start()
        s.healed()
        tally = s.settle()
        tally.notes.append(f"PostgreSQL down {down_for:.0f} s after a crash, {busy} job(s) mid-run")
        expect_codes(tally, DEPENDENCY_CODES)
        return tally


def storage_down(lab: Lab, size: int, *, down_for: float = 10.0) -> Tally:
    """The workers' S3 refuses connections for ``down_for`` seconds while jobs finish and upload."""
    with lab.run("storage_down") as s:
        s.warm_up()
        s.submit(bodies(s, SMALL, size))
        mid_job(s, min_step=1)
        s.mark("storage cut")
        s.system.proxies["s3"].cut()
        time.sleep(down_for)
        s.system.proxies["s3"].heal()
        s.healed()
        tally = s.settle()
        expect_codes(tally, DEPENDENCY_CODES)
        return tally


def storage_blips(lab: Lab, size: int, *, blips: int = 3) -> Tally:
    """Every S3 connection reset for a second and a half, ``blips`` times, while quick jobs upload."""
    with lab.run("storage_blips") as s:
        s.warm_up()
        s.submit(bodies(s, QUICK, size), interval=min(0.3, 12.0 / size), wait=False)
        time.sleep(1.0)
        for _ in range(blips):
            s.mark("storage reset")
            s.system.proxies["s3"].reset()
            time.sleep(1.5)
            s.system.proxies["s3"].heal()
            time.sleep(2.5)
        s.healed()
        tally = s.settle()
        expect_codes(tally, DEPENDENCY_CODES)
        return tally


def worker_db_partition(lab: Lab, size: int, *, down_for: float = 10.0) -> Tally:
    """The worker's link to PostgreSQL blackholed mid-job for ``down_for`` seconds, then its
    connections reset (as a firewall forgets them), then healed."""
    with lab.run("worker_db_partition") as s:
        s.warm_up()
        s.submit(bodies(s, MEDIUM, size))
        mid_job(s)
        link = s.system.proxies["worker_db"]
        s.mark("worker-database link blackholed")
        link.blackhole()
        time.sleep(down_for)
        link.reset()
        time.sleep(0.5)
        link.heal()
        s.healed()
        tally = s.settle()
        expect_codes(tally, DEPENDENCY_CODES)
        return tally


def api_db_blackhole(lab: Lab, size: int, *, down_for: float = 15.0, bar: float = 5.0) -> Tally:
    """The API's link to PostgreSQL blackholed: a submit and /readyz must answer 503 within ``bar``
    seconds, not hang; jobs accepted before and after finish."""
    with lab.run("api_db_blackhole") as s:
        s.warm_up()
        s.submit(bodies(s, QUICK, max(1, size // 2)))
        s.mark("API-database link blackholed")
        s.system.proxies["api_db"].blackhole()
        t0 = time.monotonic()
        probes = [_Probe(s, "POST", "/v1/jobs", s.body({**QUICK, "seed": 999})), _Probe(s, "GET", "/readyz")]
        for p in probes:
            p.start()
        for p in probes:
            p.join(max(0.0, down_for + 25 - (time.monotonic() - t0)))
        time.sleep(max(0.0, down_for - (time.monotonic() - t0)))
        s.system.proxies["api_db"].heal()
        s.healed()
        s.submit(bodies(s, QUICK, max(1, size - size // 2), seed=500))
        tally = s.settle()
        for p in probes:
            tally.check(
                f"{p.method} {p.path} answers 503 fast",
                p.status == 503 and p.seconds <= bar,
                f"{p.status} after {p.seconds:.1f} s (bar: 503 within {bar:.0f} s)",
            )
        expect_codes(tally)
        return tally


class _Probe(threading.Thread):
    """One request while the database is blackholed: what it answered and how long it took."""

    def __init__(self, s: Run, method: str, path: str, body: dict[str, Any] | None = None) -> None:
        super().__init__(daemon=True)
        self.s, self.method, self.path, self.body = s, method, path, body
        self.status: int | str = "no answer"
        self.seconds = 0.0

    def run(self) -> None:
        t0 = time.monotonic()
        headers = {"Authorization": f"Bearer {self.s.api_key}", "Idempotency-Key": uuid.uuid4().hex}
        try:
            resp = requests.request(
                self.method, self.s.system.api_url + self.path, json=self.body, headers=headers, timeout=20
            )
            self.status = resp.status_code
            if resp.status_code == 202:  # accepted after all: it is one of the scenario's jobs
                self.s.record_accepted(resp.json()["id"])
        except requests.RequestException as exc:
            self.status = type(exc).__name__
        self.seconds = time.monotonic() - t0
