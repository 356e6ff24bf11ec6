"""A cancel stops a running job within one denoising step: the worker's job runner in this process,
with the real engine on the tiny SD 1.5 model and the real PostgreSQL (a scratch database, so the
running system's worker never takes the job), canceled through the same service call the API's
cancel route makes, on a connection of its own.

The engine's steps are recorded as it reports them, and the cancel is committed between two steps,
so the step at which the cancel was accepted is exact rather than a guess from polling; the run may
finish the step that follows (it was already computing), and must stop at its end."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import select

from inference_server.db import Job, JobEvent, JobOutput
from inference_server.jobs.service import cancel, submit
from inference_server.jobs.spec import JobRequest
from inference_server.storage import open_storage
from tests.support.seed import scratch_jobs

STEPS = 50
LONG = {"family": "sd15", "prompt": "a slow tide", "width": 256, "height": 256, "steps": STEPS, "seed": 1}
CANCEL_AT = 3  # the cancel is committed after this step and before the next


class RecordedEngine:
    """The real engine, with each step it reports to the job runner kept in ``steps``, and
    ``between_steps(step)`` called after the report of ``step``, before the next one starts."""

    def __init__(self, engine: Any, between_steps: Callable[[int], None]) -> None:
        self.engine = engine
        self.between_steps = between_steps
        self.steps: list[int] = []

    def generate(self, request: Any, on_step: Any = None) -> Any:
        def record(step: int, total: int) -> bool:
            self.steps.append(step)
            self.between_steps(step)
            return bool(on_step(step, total)) if on_step is not None else False

        return self.engine.generate(request, on_step=record)


def test_a_cancel_stops_the_run_within_one_step(settings, scratch_db_url, scratch_db) -> None:  # type: ignore[no-untyped-def]
    from inference_server.engine.runner import Engine
    from workers.runner import JobRunner

    on = scratch_jobs(settings, scratch_db_url, scratch_db, "cancel")
    local, registry, ctx, tenant = on.settings, on.registry, on.ctx, on.tenant
    with scratch_db() as session:
        job_id = submit(session, ctx, tenant, JobRequest.model_validate(LONG)).job_id
    accepted_at: list[int] = []

    def cancel_once(step: int) -> None:
        if step == CANCEL_AT and not accepted_at:
            with scratch_db() as session:
                assert cancel(session, ctx, tenant, job_id).status == "canceled"
            accepted_at.append(step)

    engine = RecordedEngine(Engine(registry), between_steps=cancel_once)
    outcome = JobRunner(local, scratch_db, open_storage(local), engine).run(job_id)

    assert accepted_at == [CANCEL_AT]  # the cancel was accepted mid-run, with steps to spare
    final_step = engine.steps[-1]
    assert engine.steps == list(range(1, final_step + 1))  # one report per step, none skipped
    assert outcome == "canceled"
    # The step computed while the cancel reached the run may end; the run stops there.
    assert CANCEL_AT <= final_step <= CANCEL_AT + 1, f"canceled at step {CANCEL_AT}, stopped at {final_step}"

    with scratch_db() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.status == "canceled"
        assert (job.progress_step or 0) <= CANCEL_AT  # nothing is recorded for the run after its cancel
        assert session.scalars(select(JobOutput).where(JobOutput.job_id == job_id)).all() == []
        events = list(
            session.scalars(select(JobEvent.type).where(JobEvent.job_id == job_id).order_by(JobEvent.seq))
        )
    assert events[-1] == "job.canceled" and "job.succeeded" not in events


def test_a_canceled_run_lets_the_gate_take_the_next_message_before_it_stops(
    settings, scratch_db_url, scratch_db
) -> None:  # type: ignore[no-untyped-def]
    """The gate is told a run ends as soon as its watcher sees the cancel, while the run is still
    in the step it stops after: the next message's delivery and claim overlap that step, rather
    than waiting for the run's end (near a run's natural end, ``ending`` is told at its last steps;
    this run never gets there)."""
    import threading

    from inference_server.engine.runner import Engine
    from workers.runner import JobRunner

    on = scratch_jobs(settings, scratch_db_url, scratch_db, "cancel-tell")
    local, registry, ctx, tenant = on.settings, on.registry, on.ctx, on.tenant
    with scratch_db() as session:
        job_id = submit(session, ctx, tenant, JobRequest.model_validate(LONG)).job_id
    told: list[str] = []
    heard = threading.Event()
    told_mid_run: list[bool] = []

    def tell(job: str) -> None:
        told.append(job)
        heard.set()

    def cancel_then_wait(step: int) -> None:
        if step == CANCEL_AT and not told_mid_run:
            with scratch_db() as session:
                assert cancel(session, ctx, tenant, job_id).status == "canceled"
            told_mid_run.append(heard.wait(10))  # the run is held in this step meanwhile

    engine = RecordedEngine(Engine(registry), between_steps=cancel_then_wait)
    runner = JobRunner(local, scratch_db, open_storage(local), engine, finish_in_flight=1, ending=tell)
    try:
        outcome = runner.run(job_id)
    finally:
        runner.close(timeout=10)
    assert told_mid_run == [True], "the gate was not told until the canceled run ended"
    assert told == [job_id] and outcome == "canceled"
    assert engine.steps[-1] <= CANCEL_AT + 1
