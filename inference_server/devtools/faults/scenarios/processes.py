"""Faults of the workers themselves: killed (child or main) or stopped mid-job, a job that kills its
worker every time, and a job longer than the broker's consumer timeout."""

from __future__ import annotations

import signal
import time

from inference_server.devtools.faults.lab import Lab
from inference_server.devtools.faults.scenarios.kit import (
    LONG,
    MEDIUM,
    QUICK,
    bodies,
    expect_codes,
    expect_no_reruns,
    log_count,
    mid_job,
)
from inference_server.devtools.faults.tally import TERMINAL, Tally


def worker_child_sigkill(lab: Lab, size: int) -> Tally:
    """SIGKILL a worker's pool child mid-job (an OOM kill, a segfault in a kernel); its main process
    forks a new child and the job must finish, once."""
    with lab.run("worker_child_sigkill") as s:
        s.warm_up()
        s.submit(bodies(s, MEDIUM, size))
        hit: set[str] = set()
        for _ in range(max(1, size // 4)):
            job = mid_job(s, not_ids=hit)
            hit.add(job["id"])
            s.mark(f"SIGKILL the pool child at step {job['progress_step']}")
            s.worker_of(job["id"]).signal_children(signal.SIGKILL)
        s.healed()
        tally = s.settle()
        tally.notes.append(f"killed a pool child during {len(hit)} job(s)")
        expect_codes(tally)
        return tally


def worker_main_sigkill(lab: Lab, size: int) -> Tally:
    """SIGKILL a worker's main process mid-job (its child lives on, orphaned, as it would in
    production); a supervisor starts a new worker."""
    with lab.run("worker_main_sigkill") as s:
        s.warm_up()
        s.submit(bodies(s, MEDIUM, size))
        hit: set[str] = set()
        for _ in range(max(1, size // 4)):
            job = mid_job(s, not_ids=hit)
            hit.add(job["id"])
            old = s.worker_of(job["id"])
            s.mark(f"SIGKILL a worker's main process at step {job['progress_step']}")
            old.signal_main(signal.SIGKILL)
            s.system.replace_worker(old)
            s.mark("replacement worker ready")
        s.healed()
        tally = s.settle()
        tally.notes.append(f"killed a worker's main process during {len(hit)} job(s)")
        expect_codes(tally)
        return tally


def worker_sigterm(lab: Lab, size: int) -> Tally:
    """SIGTERM mid-job (a deploy, a scale-down): the worker finishes its job and exits; a new worker
    takes over. Nothing runs twice."""
    with lab.run("worker_sigterm") as s:
        s.warm_up()
        s.submit(bodies(s, MEDIUM, size))
        job = mid_job(s)
        old = s.worker_of(job["id"])
        s.mark(f"SIGTERM a worker at step {job['progress_step']}")
        old.signal_main(signal.SIGTERM)
        s.system.replace_worker(old)
        s.mark(f"it exited ({old.proc.returncode}); replacement ready")
        s.healed()
        tally = s.settle()
        tally.check("stopped cleanly", old.proc.returncode == 0, f"exit code {old.proc.returncode}")
        expect_no_reruns(tally)
        expect_codes(tally)
        return tally


def killer_job(lab: Lab, size: int, *, budget: float = 240.0) -> Tally:
    """A job whose every run kills its worker's child (done from outside: SIGKILL as soon as each
    attempt runs). It must end failed ``too_many_attempts``; the jobs around it succeed."""
    with lab.run("killer_job") as s:
        s.warm_up()
        before = s.accepted_ids()
        s.submit(bodies(s, MEDIUM, 1, seed=666))
        (killer,) = s.accepted_ids() - before
        s.submit(bodies(s, QUICK, size, seed=1))
        killed: set[int] = set()
        deadline = time.monotonic() + budget
        while time.monotonic() < deadline:
            rows = s.rows({killer})
            if rows and rows[0]["status"] in TERMINAL:
                break
            for row in s.running(min_step=1):
                if row["id"] == killer and row["attempts"] not in killed:
                    s.mark(f"SIGKILL the pool child in attempt {row['attempts']} of the killer job")
                    s.worker_of(killer).signal_children(signal.SIGKILL)
                    killed.add(row["attempts"])
            time.sleep(0.05)
        s.healed()
        tally = s.settle()
        row = s.rows({killer})[0]
        tally.check(
            "killer failed too_many_attempts",
            row["status"] == "failed" and row["error_code"] == "too_many_attempts",
            f"status {row['status']} code {row['error_code']} after {len(killed)} kill(s)",
        )
        expect_codes(tally, {"too_many_attempts"})
        tally.check("only the killer failed", sum(tally.failed.values()) <= 1, str(dict(tally.failed)))
        return tally


def long_job(lab: Lab, size: int, *, consumer_timeout_s: int = 10) -> Tally:
    """Jobs longer than the broker's delivery acknowledgement timeout, on a node whose global
    ``consumer_timeout`` is short (RabbitMQ 3.10 has no per-queue one): each runs once and
    succeeds, and no worker dies."""
    with (
        lab.extra_rabbit(consumer_timeout_s * 1000) as node,
        lab.own_system(node) as system,
        lab.run("long_job", system=system) as s,
    ):
        # No warm-up: a cold child's first job (torch and the model loading) holds its delivery
        # unacknowledged too, which is the same fault.
        s.submit(bodies(s, LONG, size, seed=7))
        long_ids = s.accepted_ids()
        s.submit(bodies(s, QUICK, 2, seed=100))
        s.healed()  # no fault heals here: the allowance covers the jobs' own length
        tally = s.settle(allowance=100.0 * size)
        runs = {
            r["id"]: (r["finished_at"] - r["started_at"]).total_seconds()
            for r in s.rows(long_ids)
            if r["status"] == "succeeded" and r["finished_at"] and r["started_at"]
        }
        tally.check(
            "long jobs ran past the timeout and succeeded",
            len(runs) == len(long_ids) and all(t > consumer_timeout_s for t in runs.values()),
            f"{len(runs)}/{len(long_ids)} succeeded, runs {sorted(round(t) for t in runs.values())} s, "
            f"consumer_timeout {consumer_timeout_s} s",
        )
        timeouts = log_count(s, "worker", "PreconditionFailed")
        tally.check("no consumer timeout", timeouts == 0, f"{timeouts} PreconditionFailed in worker logs")
        expect_no_reruns(tally)
        expect_codes(tally)
        return tally
