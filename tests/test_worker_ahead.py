"""Claiming the next job ahead of its run (workers/ahead.py): the worker's job runner in this process,
with the real engine on the tiny SD 1.5 model and the real PostgreSQL (a scratch database, so the
running system's worker never takes these jobs). The offers a worker's main process sends down its
pipe are made here by hand, so which job is claimed ahead, and when, is exact."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import select

from inference_server.db import Job, JobEvent, JobOutput, OutboxMessage
from inference_server.jobs.service import cancel, submit
from inference_server.jobs.spec import JobRequest
from inference_server.publish.topology import RUN_JOB, default_queue
from inference_server.storage import open_storage
from tests.support.seed import scratch_jobs
from tests.support.waiting import wait_for

BODY = {"family": "sd15", "prompt": "a lantern on a quay", "width": 64, "height": 64, "steps": 3}
QUEUE = default_queue("sd15")


@pytest.fixture
def local(settings, scratch_db_url, scratch_db) -> Iterator[dict[str, Any]]:  # type: ignore[no-untyped-def]
    from inference_server.engine.runner import Engine
    from workers.runner import JobRunner

    on = scratch_jobs(settings, scratch_db_url, scratch_db, "ahead")
    engine = Engine(on.registry)
    runner = JobRunner(on.settings, scratch_db, open_storage(on.settings), engine, ahead=True)
    try:
        yield {"ctx": on.ctx, "tenant": on.tenant, "sf": scratch_db, "runner": runner, "engine": engine}
    finally:
        runner.close()


def _submit(local: dict[str, Any], **extra: Any) -> str:
    with local["sf"]() as session:
        request = JobRequest.model_validate({**BODY, "seed": 11, **extra})
        return submit(session, local["ctx"], local["tenant"], request).job_id


def _job(local: dict[str, Any], job_id: str) -> Job:
    with local["sf"]() as session:
        job = session.get(Job, job_id)
        assert job is not None
        session.expunge(job)
        return job


def _events(local: dict[str, Any], job_id: str) -> list[str]:
    with local["sf"]() as session:
        query = select(JobEvent.type).where(JobEvent.job_id == job_id).order_by(JobEvent.seq)
        return list(session.scalars(query))


def _outbox(local: dict[str, Any], job_id: str) -> list[str]:
    with local["sf"]() as session:
        query = select(OutboxMessage.queue).where(OutboxMessage.job_id == job_id).order_by(OutboxMessage.id)
        return list(session.scalars(query))


def _digests(local: dict[str, Any], job_id: str) -> list[str | None]:
    """The stored images' sha256, in order, as their bytes read back from storage give it."""
    storage = local["runner"].storage
    with local["sf"]() as session:
        rows = session.scalars(select(JobOutput).where(JobOutput.job_id == job_id).order_by(JobOutput.index))
        digests = []
        for row in rows:
            assert row.uri is not None and hashlib.sha256(storage.get(row.uri)).hexdigest() == row.sha256
            digests.append(row.sha256)
        return digests


def test_a_job_claimed_ahead_runs_from_that_claim_with_the_same_bytes(local) -> None:  # type: ignore[no-untyped-def]
    from workers.runner import JobRunner

    ahead, plain = _submit(local), _submit(local)
    runner = local["runner"]
    runner.ahead.offer(ahead, QUEUE)
    claimed = _job(local, ahead)
    assert (claimed.status, claimed.attempts) == ("running", 1)  # committed before its task comes
    assert claimed.lease_expires_at is not None

    assert runner.run(ahead, queue=QUEUE) == "succeeded"
    done = _job(local, ahead)
    assert (done.status, done.attempts) == ("succeeded", 1)  # the run did not claim it again
    assert _events(local, ahead).count("job.started") == 1

    # The same request run without a claim ahead gives the same bytes.
    s = runner.settings
    assert JobRunner(s, local["sf"], open_storage(s), local["engine"]).run(plain, queue=QUEUE) == "succeeded"
    assert _digests(local, ahead) == _digests(local, plain) and _digests(local, ahead)


def test_a_job_claimed_ahead_whose_task_goes_elsewhere_is_given_back_uncounted(local) -> None:  # type: ignore[no-untyped-def]
    passed_over, next_run = _submit(local), _submit(local)
    submitted = _outbox(local, passed_over)  # its first message (no relay publishes it here)
    runner = local["runner"]
    runner.ahead.offer(passed_over, QUEUE)
    assert _job(local, passed_over).status == "running"

    # Another job's task reaches the child: the one claimed ahead will not run next, so it goes back.
    assert runner.run(next_run, queue=QUEUE) == "succeeded"
    back = _job(local, passed_over)
    assert (back.status, back.attempts, back.lease_expires_at, back.worker) == ("queued", 0, None, None)
    assert _outbox(local, passed_over) == [*submitted, QUEUE]  # its message goes out again
    assert _events(local, passed_over)[-2:] == ["job.started", "job.queued"]

    # Its message, published again, runs it as a first attempt.
    assert runner.run(passed_over, queue=QUEUE) == "succeeded"
    assert _job(local, passed_over).attempts == 1


def test_a_job_canceled_while_claimed_ahead_ends_canceled_when_its_task_comes(local) -> None:  # type: ignore[no-untyped-def]
    job_id = _submit(local, steps=40, width=128, height=128)
    runner = local["runner"]
    runner.ahead.offer(job_id, QUEUE)
    with local["sf"]() as session:
        assert cancel(session, local["ctx"], local["tenant"], job_id).status == "canceled"

    assert runner.run(job_id, queue=QUEUE) == "canceled"
    assert _job(local, job_id).status == "canceled"
    assert _digests(local, job_id) == []


def test_an_offer_down_the_pipe_is_claimed_and_given_back_when_no_task_comes(local) -> None:  # type: ignore[no-untyped-def]
    job_id = _submit(local)
    claims = local["runner"].ahead
    claims.hold = 1.0  # the child waits this long for the task of a job it claimed ahead
    read, write = os.pipe()
    try:
        claims.read_from(read)
        os.write(write, f"{job_id} {QUEUE}\n".encode())
        wait_for(lambda: _job(local, job_id).status == "running", timeout=30, what="the claim ahead")
        wait_for(lambda: _job(local, job_id).status == "queued", timeout=30, what="the give-back")
    finally:
        claims.close()
        os.close(write)
        os.close(read)
    assert _job(local, job_id).attempts == 0
    # A task that comes after all finds no claim ahead and claims the job itself.
    assert local["runner"].run(job_id, queue=QUEUE) == "succeeded"


def test_the_gate_names_only_the_first_job_message_since_it_resumed() -> None:
    """The main process's side of the pipe: the first job message since the gate resumed is the
    child's next run and is announced; one delivered after it is not."""
    from workers.gate import GATE

    class Message:
        name = RUN_JOB
        delivery_info = {"routing_key": QUEUE}

        def __init__(self, job_id: str) -> None:
            self.args = [job_id]

    saved = (GATE.ahead, GATE._announcing)
    GATE.ahead, GATE._announcing = True, True
    try:
        GATE.announce(Message("first"))
        GATE.announce(Message("second"))  # not the child's next run: the gate has not resumed
        os.set_blocking(GATE.next_r, False)
        assert os.read(GATE.next_r, 4096) == f"first {QUEUE}\n".encode()
    finally:
        GATE.ahead, GATE._announcing = saved


class _TaskConsumer:
    """Counts the gate's resumes: the part of Celery's task consumer the gate calls."""

    consumed = 0

    def consume(self) -> None:
        self.consumed += 1

    def cancel(self) -> None:
        pass


class _Consumer:
    def __init__(self) -> None:
        self.task_consumer = _TaskConsumer()


def test_a_shutting_down_gate_neither_resumes_nor_announces() -> None:
    """Once a warm shutdown begins, the run's end does not resume consumption (Celery would
    receive a message it never runs) and no job is announced for the child to claim ahead (it
    would be given back, its job seen started twice: the worker_sigterm fault scenario)."""
    from workers.gate import GATE

    class Message:
        name = RUN_JOB
        delivery_info = {"routing_key": QUEUE}
        args = ["next"]

    consumer = _Consumer()
    saved = (GATE.consumer, GATE.holder, GATE.ahead, GATE._announcing, GATE.closing)
    GATE.consumer, GATE.holder, GATE.ahead = consumer, None, True
    try:
        running = object()
        GATE.pause(running)
        GATE.close()
        GATE.resume(running)
        GATE.announce(Message())
        assert consumer.task_consumer.consumed == 0 and GATE.holder is None
        os.set_blocking(GATE.next_r, False)
        with pytest.raises(BlockingIOError):
            os.read(GATE.next_r, 4096)
    finally:
        GATE.consumer, GATE.holder, GATE.ahead, GATE._announcing, GATE.closing = saved


def test_an_ending_heard_before_its_run_is_accepted_resumes_at_the_acceptance() -> None:
    """A short run's child can say it nears its end before the main process has seen it accept
    the task: the word is kept, and the acceptance resumes consumption at once (else the next
    message would come only after the run ended, the device idle meanwhile)."""
    from workers.gate import GATE

    class Request:
        id = "short-run"

    consumer = _Consumer()
    saved = (GATE.consumer, GATE.holder, GATE._announcing, GATE.closing)
    GATE.consumer, GATE.holder, GATE.closing = consumer, None, False
    try:
        GATE.ending(Request.id)
        GATE._on_ending()  # heard while no run holds the gate
        assert consumer.task_consumer.consumed == 0
        run = Request()
        GATE.pause(run)
        GATE.accepted(run)
        assert consumer.task_consumer.consumed == 1 and GATE.holder is None
        GATE.pause(other := type("R", (), {"id": "another"})())
        GATE.accepted(other)  # no word from it yet: the gate stays paused
        assert consumer.task_consumer.consumed == 1 and GATE.holder is other
    finally:
        GATE.consumer, GATE.holder, GATE._announcing, GATE.closing = saved


def test_a_late_ending_of_an_earlier_run_does_not_resume_a_later_run_of_that_job() -> None:
    """A word that comes while another run holds the gate is about an earlier run (its cancel seen
    after its denoising, say). Kept, it would resume consumption as soon as that job ran here
    again (a retry), and the next message would wait unacknowledged through all of that run."""
    from workers.gate import GATE

    def request(job_id: str) -> object:
        return type("R", (), {"id": job_id})()

    consumer = _Consumer()
    saved = (GATE.consumer, GATE.holder, GATE._announcing, GATE.closing)
    GATE.consumer, GATE.holder, GATE.closing = consumer, None, False
    try:
        GATE.pause(current := request("current"))
        GATE.ending("earlier")
        GATE._on_ending()  # late: "current" holds the gate
        GATE.resume(current)
        assert consumer.task_consumer.consumed == 1
        GATE.pause(retry := request("earlier"))
        GATE.accepted(retry)
        assert consumer.task_consumer.consumed == 1 and GATE.holder is retry
        GATE.resume(retry)
    finally:
        GATE.consumer, GATE.holder, GATE._announcing, GATE.closing = saved


def test_a_run_canceled_after_its_denoising_tells_the_gate_nothing(  # type: ignore[no-untyped-def]
    settings, scratch_db_url, scratch_db
) -> None:
    """The finisher was full as the last step began, so the run did not tell the gate then; once
    denoised, its job is canceled while being finished. Its watcher sees that cancel, but the run is
    over: telling the gate now would be a word about a finished run, heard during the next one."""
    from inference_server.engine.runner import Engine
    from workers.runner import JobRunner

    on = scratch_jobs(settings, scratch_db_url, scratch_db, "ahead-late")
    told: list[str] = []
    storage, engine = open_storage(on.settings), Engine(on.registry)
    runner = JobRunner(on.settings, scratch_db, storage, engine, finish_in_flight=1, ending=told.append)
    room = [False]
    runner._room = lambda: room[0]  # type: ignore[method-assign]
    local = {"ctx": on.ctx, "tenant": on.tenant, "sf": scratch_db}
    try:
        job_id = _submit(local)
        claim, recorded = runner._claim(job_id)  # type: ignore[misc]
        _, watcher = runner._start_watching(claim, recorded)
        step = runner._step_callback(watcher, claim)
        try:
            assert [step(done, 4) for done in range(1, 5)] == [False] * 4  # the last step: no room
            runner._watched(watcher, lambda: [])
            room[0] = True  # the finisher has room again
            with scratch_db() as session:
                cancel(session, on.ctx, on.tenant, job_id)
            wait_for(lambda: watcher.canceled, 10, what="the watcher to see the cancel")
            time.sleep(0.2)
            assert told == []
        finally:
            watcher.stop()
    finally:
        runner.close()


def test_a_claim_ahead_waits_for_room_in_the_finisher_and_yields_to_its_run(local) -> None:  # type: ignore[no-untyped-def]
    """With the finisher full, the job denoising now waits to hand over before the next can
    begin: the next job is not shown running meanwhile, and a run that begins first claims it."""
    from workers.ahead import AheadClaims

    runner = local["runner"]
    room = threading.Event()
    claims = AheadClaims(runner._prepare_ahead, runner._give_back, hold=60, room=room.is_set)
    job_id = _submit(local)
    offer = threading.Thread(target=claims.offer, args=(job_id, QUEUE))
    offer.start()
    time.sleep(0.5)
    assert _job(local, job_id).status == "queued"  # no room yet: not claimed
    assert claims.take(job_id) is None  # its task came first: the run claims it itself
    offer.join(10)
    assert not offer.is_alive() and _job(local, job_id).status == "queued"

    room.set()
    later = _submit(local)
    claims.offer(later, QUEUE)
    assert _job(local, later).status == "running"
    prepared = claims.take(later)
    assert prepared is not None and prepared.claim.job_id == later
    runner._give_back(prepared)
    assert (_job(local, later).status, _job(local, later).attempts) == ("queued", 0)


def test_a_closed_child_claims_nothing_more_ahead(local) -> None:  # type: ignore[no-untyped-def]
    """A recycled child closes its runner while the next job's message may still be announced
    on the pipe it shares with its replacement: it must not claim that job and exit with it."""
    claims = local["runner"].ahead
    claims.close()
    job_id = _submit(local)
    claims.offer(job_id, QUEUE)
    assert _job(local, job_id).status == "queued"


def test_a_lead_claimed_ahead_brings_its_batch_and_gives_it_all_back(  # type: ignore[no-untyped-def]
    settings, scratch_db_url, scratch_db
) -> None:
    """Where the registry batches the model, the claim ahead also gathers the lead's batch, so
    the members' claims are off the device's time too; given back, every member goes back."""
    from pathlib import Path

    from inference_server.devtools.registry_edit import with_family_keys
    from inference_server.engine.runner import Engine
    from workers.runner import JobRunner

    models = with_family_keys(Path(settings.models_file), "sd15", "models-ahead-batch.toml", max_batch=3)
    on = scratch_jobs(settings, scratch_db_url, scratch_db, "ahead-batch", models_file=str(models))
    local = {"sf": scratch_db, "ctx": on.ctx, "tenant": on.tenant}
    runner = JobRunner(on.settings, scratch_db, open_storage(on.settings), Engine(on.registry), ahead=True)
    try:
        lead, *others = [_submit(local, seed=20 + i) for i in range(3)]
        runner.ahead.offer(lead, QUEUE)
        assert {_job(local, i).status for i in (lead, *others)} == {"running"}  # one batch, claimed ahead
        prepared = runner.ahead.take(lead)
        assert prepared is not None and sorted(m.job_id for m, _ in prepared.members) == sorted(others)
        runner._give_back(prepared)
        back = [_job(local, i) for i in (lead, *others)]
        assert [(j.status, j.attempts) for j in back] == [("queued", 0)] * 3

        runner.ahead.offer(lead, QUEUE)
        assert runner.run(lead, queue=QUEUE) == "succeeded"  # the batch ran in one call
        ran = [_job(local, i) for i in (lead, *others)]
        assert [(j.status, j.attempts) for j in ran] == [("succeeded", 1)] * 3
        assert len({j.batch_id for j in ran}) == 1 and ran[0].batch_id is not None
    finally:
        runner.close()


def test_a_run_tells_the_gate_as_early_as_claims_ahead_take_and_at_the_latest_at_its_last_step() -> None:
    from workers.ahead import MARGIN, MAX_LEAD, RECENT, AheadClaims
    from workers.runner import _telling_near_end

    def steps(lead: float, room: list[bool], pace: float = 0.0) -> list[int]:
        told: list[int] = []
        state = {"done": 0}

        def ending() -> bool:
            if not room.pop(0):
                return False
            told.append(state["done"])
            return True

        step = _telling_near_end(lambda done, total: False, ending, lead)
        for done in range(1, 7):
            time.sleep(pace)
            state["done"] = done
            step(done, 6)
        return told

    assert steps(0.0, [True] * 6) == [5]  # no lead: as the last step begins
    assert steps(0.1, [True] * 6, pace=0.03) in ([3], [4])  # three or four steps of 30 ms left
    assert steps(10.0, [False, False, True, True, True]) == [3]  # no room yet: asked again each step
    assert steps(0.0, [False, False, False, False, False]) == []  # never any room: never told

    # The lead is learnt from the slowest of the recent claims' times from the telling, and capped.
    claims = AheadClaims(lambda job_id, queue: None, lambda prepared: None, hold=1.0)
    for pause in (0.05, 0.01):
        claims.told()
        time.sleep(pause)
        claims.offer("a", "q")
    assert MARGIN * 0.05 <= claims.lead < MARGIN * 0.05 + 0.04  # the slower one sets it
    for _ in range(RECENT):  # forgotten once RECENT faster ones came after it
        claims.told()
        claims.offer("a", "q")
    assert claims.lead < MARGIN * 0.04
    for _ in range(RECENT):
        claims.told()
        claims._told_at -= 2  # type: ignore[operator]  # claims that took seconds
        claims.offer("b", "q")
    assert claims.lead == MAX_LEAD  # capped
    for _ in range(RECENT):
        claims.told()
        claims.offer("a", "q")
    claims.told()
    claims._told_at -= 60  # type: ignore[operator]  # told, then no message came for a minute
    claims.offer("c", "q")
    assert claims.lead < MARGIN * 0.04  # an idle queue says nothing of the lead needed


def test_the_gate_hears_once_of_a_run_whose_end_nears_as_it_is_canceled(
    settings, scratch_db_url, scratch_db
) -> None:  # type: ignore[no-untyped-def]
    """The watcher thread (the run was canceled) and the step thread (its last step begins) can
    both find a run ending at the same moment: the gate is told once."""
    from types import SimpleNamespace

    from inference_server.engine.runner import Engine
    from workers.runner import JobRunner

    on = scratch_jobs(settings, scratch_db_url, scratch_db, "ahead-once")
    told: list[str] = []
    storage, engine = open_storage(on.settings), Engine(on.registry)
    runner = JobRunner(on.settings, scratch_db, storage, engine, finish_in_flight=1, ending=told.append)
    checking, go = threading.Event(), threading.Event()

    def room() -> bool:  # holds the first caller between its check and its telling
        checking.set()
        return go.wait(10)

    try:
        runner._room = room  # type: ignore[method-assign]
        hooks: list = []  # type: ignore[type-arg]
        watcher = SimpleNamespace(on_step=lambda done, total: False, when_unwanted=hooks.append)
        step = runner._step_callback(watcher, SimpleNamespace(job_id="j"))  # type: ignore[arg-type]
        unwanted = threading.Thread(target=hooks[-1])
        unwanted.start()
        assert checking.wait(10)
        last_step = threading.Thread(target=step, args=(5, 6))
        last_step.start()
        time.sleep(0.2)
        go.set()
        unwanted.join(10)
        last_step.join(10)
        assert told == ["j"]
    finally:
        runner.close()
