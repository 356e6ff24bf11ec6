"""What the scenarios share: the job bodies, waiting for a job to be mid-run, and the checks on
failure codes."""

from __future__ import annotations

import time
from typing import Any

from inference_server.devtools.faults.run import Run
from inference_server.devtools.faults.tally import Tally

# Sizes on the tiny sd15 model: QUICK is a fraction of a second, MEDIUM about a second and a half of
# denoising (long enough to be caught mid-run), LONG well over the long-job scenario's consumer timeout.
QUICK: dict[str, Any] = {
    "family": "sd15",
    "prompt": "a lighthouse at dusk",
    "width": 64,
    "height": 64,
    "steps": 4,
}
MEDIUM: dict[str, Any] = {**QUICK, "prompt": "a harbour at night", "width": 256, "height": 256, "steps": 50}
LONG: dict[str, Any] = {
    **QUICK,
    "prompt": "a slow tide",
    "width": 512,
    "height": 512,
    "steps": 50,
    "num_images": 4,
}

# Codes a job may fail with when a dependency stayed down past its retry budget (today's and the
# ones the reliability issue introduces); never internal_error.
DEPENDENCY_CODES = frozenset(
    {"storage_error", "storage_unavailable", "dependency_unavailable", "database_unavailable"}
)


def bodies(
    run: Run,
    base: dict[str, Any],
    n: int,
    *,
    seed: int = 0,
    all_events: bool = False,
) -> list[dict[str, Any]]:
    """``n`` copies of ``base`` with their own seeds and a webhook to the run's receiver (terminal
    events only unless ``all_events``)."""
    out = []
    for i in range(n):
        body = {**base, "seed": seed + i}
        out.append(run.body(body, events=None) if all_events else run.body(body))
    return out


def mid_job(
    run: Run, *, min_step: int = 2, timeout: float = 90, not_ids: set[str] | None = None
) -> dict[str, Any]:
    """Wait until some job (not one of ``not_ids``) is running at ``min_step`` or later; return it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for row in run.running(min_step=min_step):
            if row["id"] not in (not_ids or set()):
                return row
        time.sleep(0.05)
    raise TimeoutError(f"{run.name}: no job got to step {min_step} within {timeout:.0f} s")


def expect_codes(tally: Tally, allowed: frozenset[str] | set[str] = frozenset()) -> None:
    """A job may fail only with an ``allowed`` code here (the fault justifies it), never internal_error."""
    wrong = {code: n for code, n in tally.failed.items() if code not in allowed}
    tally.check("failure codes", not wrong, f"unexpected {wrong}" if wrong else f"allowed {sorted(allowed)}")


def expect_no_reruns(tally: Tally) -> None:
    tally.check("ran once", tally.reruns == 0, f"{tally.reruns} job(s) started more than once")


def log_count(run: Run, role: str, needle: str) -> int:
    return run.system.logs_of(role).count(needle)
