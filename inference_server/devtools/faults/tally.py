"""The count a scenario ends with, read from the database, the webhook receiver and the processes,
and the verdict: a scenario is done when every accepted job is terminal in time, none is lost or
recorded twice, no terminal event reached the receiver under two ids, and no worker died on its own."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

TERMINAL = ("succeeded", "failed", "canceled")
TERMINAL_EVENTS = ("job.succeeded", "job.failed", "job.canceled")


@dataclass
class Tally:
    scenario: str
    accepted: int = 0
    succeeded_once: int = 0
    failed: Counter[str] = field(default_factory=Counter)  # per error code
    canceled: int = 0
    lost: int = 0  # accepted (202) but not in the database
    recorded_twice: int = 0  # more than one terminal event, or more outputs than images
    stuck: int = 0  # not terminal at the deadline
    stuck_in: Counter[str] = field(default_factory=Counter)  # their statuses
    dup_webhook_ids: int = 0  # distinct terminal webhook ids per (job, event) beyond one
    webhooks_missing: int = 0  # a terminal job whose terminal webhook never arrived
    bad_signatures: int = 0
    workers_dead: int = 0  # worker processes that exited without the scenario stopping them
    reruns: int = 0  # jobs started more than once (a fault may justify it; a long job must not)
    refused: int = 0  # submits answered 503 (then retried with the same Idempotency-Key)
    settle_s: float | None = None  # last fault healed -> every job terminal, its terminal webhook in
    checks: dict[str, tuple[bool, str]] = field(default_factory=dict)  # scenario-specific expectations
    notes: list[str] = field(default_factory=list)

    def check(self, name: str, ok: bool, detail: str = "") -> None:
        self.checks[name] = (bool(ok), detail)

    @property
    def failures(self) -> list[str]:
        """Why the scenario is not done; empty when it is."""
        out = []
        for name in (
            "lost",
            "recorded_twice",
            "stuck",
            "dup_webhook_ids",
            "webhooks_missing",
            "bad_signatures",
            "workers_dead",
        ):
            if getattr(self, name):
                out.append(f"{name}={getattr(self, name)}")
        out += [f"{name}: {detail}" for name, (ok, detail) in self.checks.items() if not ok]
        return out

    @property
    def done(self) -> bool:
        return not self.failures

    def report(self) -> str:
        lines = [format_table([self])]
        if self.stuck:
            lines.append(f"  stuck in: {dict(self.stuck_in)}")
        lines += [
            f"  check {name}: {'ok' if ok else 'FAILED'} {detail}"
            for name, (ok, detail) in self.checks.items()
        ]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def count_jobs(tally: Tally, rows: list[dict[str, Any]], accepted: set[str]) -> dict[str, dict[str, Any]]:
    """Fill the job columns of ``tally`` from ``rows`` (see ``lab.job_rows``); return rows by id."""
    by_id = {r["id"]: r for r in rows}
    tally.accepted = len(accepted)
    tally.lost = len(accepted - by_id.keys())
    for job_id in accepted & by_id.keys():
        r = by_id[job_id]
        params = r["params"] or {}
        images = len(params.get("seeds") or ()) or int(params.get("num_images") or 1)  # JobSpec or older
        twice = r["terminal_events"] > 1 or r["outputs"] > images
        tally.recorded_twice += twice
        tally.reruns += r["started_events"] > 1
        if r["status"] not in TERMINAL:
            tally.stuck += 1
            tally.stuck_in[r["status"]] += 1
        elif r["status"] == "succeeded":
            tally.succeeded_once += not twice and r["outputs"] == images
        elif r["status"] == "failed":
            tally.failed[r["error_code"] or "?"] += 1
        else:
            tally.canceled += 1
    return by_id


def count_webhooks(
    tally: Tally, by_id: dict[str, dict[str, Any]], accepted: set[str], ids: dict[tuple[str, str], set[str]]
) -> None:
    """Fill the webhook columns from the receiver's distinct ids per (job, terminal event)."""
    tally.dup_webhook_ids = sum(len(v) - 1 for (job, _), v in ids.items() if job in accepted)
    for job_id in accepted & by_id.keys():
        status = by_id[job_id]["status"]
        if status in TERMINAL and (job_id, f"job.{status}") not in ids:
            tally.webhooks_missing += 1


COLUMNS = (
    ("scenario", 26),
    ("accepted", 8),
    ("ok_once", 7),
    ("failed", 22),
    ("lost", 4),
    ("twice", 5),
    ("stuck", 5),
    ("dup_wh", 6),
    ("wh_miss", 7),
    ("dead_w", 6),
    ("reruns", 6),
    ("settle_s", 8),
    ("done", 4),
)


def _cells(t: Tally) -> list[str]:
    failed = ",".join(f"{code}:{n}" for code, n in sorted(t.failed.items())) or "0"
    settle = "-" if t.settle_s is None else f"{t.settle_s:.1f}"
    values: list[Any] = [
        t.scenario,
        t.accepted,
        t.succeeded_once,
        failed,
        t.lost,
        t.recorded_twice,
        t.stuck,
        t.dup_webhook_ids,
        t.webhooks_missing,
        t.workers_dead,
        t.reruns,
        settle,
        "yes" if t.done else "NO",
    ]
    return [str(v) for v in values]


def format_table(tallies: list[Tally]) -> str:
    """One row per scenario, the columns of the tally (the benchmark's printout)."""
    widths = [max(w, *(len(_cells(t)[i]) for t in tallies)) for i, (_, w) in enumerate(COLUMNS)]
    head = "  ".join(name.ljust(w) for (name, _), w in zip(COLUMNS, widths, strict=True))
    rows = ["  ".join(c.ljust(w) for c, w in zip(_cells(t), widths, strict=True)) for t in tallies]
    return "\n".join([head, "-" * len(head), *rows])
