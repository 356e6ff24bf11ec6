"""One scenario on a system: a tenant of its own and a receiver that verifies its webhooks, the jobs it
submits, a timeline of its faults, and at the end its tally. ``settle()`` waits until every job is
terminal (or the deadline), counts, and checks that the system still runs a job afterwards."""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from typing import Any

from inference_server.devtools.faults import procs
from inference_server.devtools.faults.common import log
from inference_server.devtools.faults.db import create_tenant, job_rows, running_jobs
from inference_server.devtools.faults.receiver import VerifyingReceiver
from inference_server.devtools.faults.submit import Submitter
from inference_server.devtools.faults.system import System
from inference_server.devtools.faults.tally import TERMINAL, Tally, count_jobs, count_webhooks

TERMINAL_ONLY = ["job.succeeded", "job.failed", "job.canceled"]
# What the workers' logs say when things go wrong, counted per run to explain a tally.
SIGNALS = {
    "retried to a queue nobody consumes": "missing from task_queues",
    "consumer timeout": "PreconditionFailed",
    "worker gave up": "Unrecoverable error",
    "pool child lost": "WorkerLostError",
    "transient failure": "transient failure, retrying",
    "message dropped": "dropping its message",
    "undecodable message": "decode message body",
}
STAMP = re.compile(r"^\[?(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)")
GRACE = 60.0  # every job terminal within this long after the last fault healed (the bar)
CANARY: dict[str, Any] = {"family": "sd15", "prompt": "a canary", "width": 64, "height": 64, "steps": 2}


class Run:
    def __init__(self, system: System, name: str, *, receiver_delay: float = 0.0) -> None:
        self.system = system
        self.name = name
        self.api_key, self.webhook_secret, self.tenant_id = create_tenant(system.database_url, name)
        self.receiver = VerifyingReceiver(self.webhook_secret, delay=receiver_delay)
        self.accepted: dict[str, float] = {}  # job id -> when its 202 came back (under _lock)
        self._lock = threading.Lock()
        self.submitters: list[Submitter] = []
        self.dead_before = {id(w) for w in system.workers if w.died()}
        self.last_heal = time.monotonic()
        self._t0 = time.monotonic()
        self._started = time.strftime("%Y-%m-%d %H:%M:%S")  # the logs' clock
        self.timeline: list[str] = []

    def mark(self, what: str) -> None:
        """A step of the scenario with its time (logged, and kept for the tally's notes)."""
        entry = f"{time.monotonic() - self._t0:.1f} s {what}"
        self.timeline.append(entry)
        log.info("%s: %s", self.name, entry)

    # -- jobs --------------------------------------------------------------------------------------

    def body(self, base: dict[str, Any], *, events: list[str] | None = TERMINAL_ONLY) -> dict[str, Any]:
        hook: dict[str, Any] = {"url": self.receiver.url}
        if events is not None:
            hook["events"] = events
        return {**base, "webhook": hook}

    def submit(self, bodies: list[dict[str, Any]], *, interval: float = 0.0, wait: bool = True) -> Submitter:
        """Submit ``bodies`` over HTTP, each with its own Idempotency-Key and retried while the API
        answers 503 or nothing; in the background unless ``wait``."""
        sub = Submitter(
            self.system.api_url, self.api_key, bodies, self.accepted, self._lock, interval=interval
        )
        self.submitters.append(sub)
        sub.start()
        if wait:
            sub.join()
        return sub

    def accepted_ids(self) -> set[str]:
        with self._lock:
            return set(self.accepted)

    def record_accepted(self, job_id: str) -> None:
        with self._lock:
            self.accepted.setdefault(job_id, time.monotonic())

    def uncounted(self, base: dict[str, Any], n: int, timeout: float = 180) -> float:
        """Run ``n`` jobs outside the tally and wait for them; their seconds per job."""
        before = self.accepted_ids()
        t0 = time.monotonic()
        self.submit([self.body(base)] * n)
        batch = self.accepted_ids() - before
        done = self.wait_terminal(batch, timeout)
        with self._lock:
            for job_id in batch:
                self.accepted.pop(job_id, None)
        if not done:
            raise TimeoutError(f"{self.name}: {n} job(s) before the fault did not finish in {timeout:.0f} s")
        return (time.monotonic() - t0) / n

    def warm_up(self, base: dict[str, Any] | None = None, n: int = 2) -> float:
        """Before any fault: every worker child has loaded the model (one job each, on the system's
        first run or after a child was replaced); returns seconds per job of a batch of ``n``."""
        self.uncounted(base or CANARY, len(self.system.live_workers()))
        per_job = self.uncounted(base or CANARY, n)
        self.mark(f"warmed up ({per_job:.2f} s per job)")
        return per_job

    def healed(self) -> None:
        """The last fault is over: the grace period starts now."""
        self.last_heal = time.monotonic()
        self.mark("healed")

    def rows(self, ids: set[str] | None = None) -> list[dict[str, Any]]:
        return job_rows(self.system.database_url, self.tenant_id, ids)

    def running(self, *, min_step: int = 1) -> list[dict[str, Any]]:
        """This tenant's jobs running at ``min_step`` or later."""
        return running_jobs(self.system.database_url, self.tenant_id, min_step=min_step)

    def pending(self) -> int:
        """Accepted jobs not terminal yet."""
        ids = self.accepted_ids()
        return len(ids) - sum(r["status"] in TERMINAL for r in self.rows(ids))

    def wait_terminal(self, ids: set[str], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = self.rows(ids)
            if len(rows) == len(ids) and all(r["status"] in TERMINAL for r in rows):
                return True
            time.sleep(0.2)
        return False

    def worker_of(self, job_id: str) -> procs.Proc:
        """The live worker that took ``job_id`` last (from the workers' "received" log lines)."""
        best: tuple[str, procs.Proc] | None = None
        for w in self.system.live_workers():
            lines = [ln for ln in w.text().splitlines() if f"[{job_id}] received" in ln]
            if lines and (best is None or _stamp(lines[-1]) > best[0]):
                best = (_stamp(lines[-1]), w)
        if best is not None:
            return best[1]
        live = self.system.live_workers()
        if len(live) == 1:
            return live[0]
        raise LookupError(f"none of {len(live)} live workers logged receiving job {job_id}")

    # -- the end -----------------------------------------------------------------------------------

    def settle(self, grace: float = GRACE, *, allowance: float = 0.0) -> Tally:
        """Wait for the submitters, then until every accepted job is terminal and its terminal webhook
        arrived, or ``grace`` (+ ``allowance`` for a backlog) after the last heal; count; then check
        that the system still runs a job."""
        for sub in self.submitters:
            sub.join(max(1.0, self.last_heal + grace - time.monotonic()))
        deadline = self.last_heal + grace + allowance
        while True:
            tally = self.tally()
            settled = tally.stuck == 0 and tally.webhooks_missing == 0
            if settled or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        if settled:
            tally.settle_s = max(0.0, time.monotonic() - self.last_heal)
        self.mark(
            "settled"
            if settled
            else f"deadline passed: {tally.stuck} stuck, {tally.webhooks_missing} terminal webhook(s) missing"
        )
        stuck = [r["id"] for r in self.rows(self.accepted_ids()) if r["status"] not in TERMINAL]
        if stuck:
            tally.notes.append(f"stuck jobs (first 3): {', '.join(stuck[:3])}")
        self._canary(tally)
        answers: Counter[str] = Counter()
        for sub in self.submitters:
            answers.update(sub.statuses)
        given_up = sum(sub.given_up for sub in self.submitters)
        tally.notes.append(
            "submits answered: "
            + ", ".join(f"{k} x{n}" for k, n in sorted(answers.items()))
            + (f"; {given_up} never accepted" if given_up else "")
        )
        signals = self.log_signals()
        if signals:
            tally.notes.append("worker logs: " + ", ".join(f"{k} x{n}" for k, n in signals.items()))
        tally.notes.append("timeline: " + "; ".join(self.timeline))
        tally.notes.append(f"logs: {self.system.logs}")
        return tally

    def log_signals(self) -> Counter[str]:
        """Known trouble in the workers' log lines written since this run started."""
        found: Counter[str] = Counter()
        for line in self.system.logs_of("worker").splitlines():
            stamp = STAMP.match(line)
            if stamp is None or stamp.group(1) < self._started:
                continue
            for name, needle in SIGNALS.items():
                if needle in line:
                    found[name] += 1
        return found

    def _canary(self, tally: Tally, timeout: float = 60.0) -> None:
        """The system must still run a job after the scenario; if not, the next scenario gets a new one."""
        try:
            self.uncounted(CANARY, 1, timeout)
            ok = True
        except TimeoutError:
            ok = False
        tally.check(
            "runs a job afterwards", ok, "" if ok else f"a canary job did not finish in {timeout:.0f} s"
        )
        self.system.broken |= not ok

    def tally(self) -> Tally:
        tally = Tally(self.name)
        accepted = self.accepted_ids()
        by_id = count_jobs(tally, self.rows(), accepted)
        count_webhooks(tally, by_id, accepted, self.receiver.terminal_ids())
        tally.bad_signatures = self.receiver.rejected
        tally.workers_dead = sum(w.died() and id(w) not in self.dead_before for w in self.system.workers)
        tally.refused = sum(s.refused for s in self.submitters)
        return tally

    def close(self) -> None:
        self.receiver.close()
        self.system.heal_all()


def _stamp(line: str) -> str:
    """When a log line was written, as text that sorts: a JSON line's ``time``, a text line's start."""
    if line.startswith("{"):
        try:
            return str(json.loads(line).get("time", ""))
        except ValueError:
            return ""
    return line[:23]
