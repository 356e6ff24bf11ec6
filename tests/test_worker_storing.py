"""The storing process (workers/storing.py): outputs stored there are the ones the finisher's thread
would store, its errors come back as themselves, and its death loses no job. On the moto S3 server
and the real PostgreSQL (a scratch database); the images are made here, not by a pipeline."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest
from PIL import Image

from inference_server.db import Job
from inference_server.errors import InferenceError, StorageUnavailable
from inference_server.jobs.service import submit
from inference_server.jobs.spec import JobRequest, JobSpec
from inference_server.storage import open_storage
from tests.support.seed import scratch_jobs
from tests.support.waiting import wait_for
from workers.outputs import Extras, Judged, store_outputs
from workers.storing import StoringProcess

BODY = {"family": "sd15", "prompt": "a kite over dunes", "width": 64, "height": 64, "steps": 2}


def _images(n: int) -> list[Image.Image]:
    return [Image.effect_noise((64, 64), 40 + 10 * i).convert("RGB") for i in range(n)]


@pytest.fixture
def storing(settings) -> Iterator[StoringProcess]:  # type: ignore[no-untyped-def]
    proc = StoringProcess(settings).start()
    try:
        yield proc
    finally:
        proc.close()


def _spec(**extra: Any) -> JobSpec:
    """A spec as the job service makes it (seeds drawn, defaults filled), without a database."""
    fields = {**BODY, "task": "txt2img", "model": "sd15-tiny", "seeds": [5, 6], "guidance_scale": 7.5}
    return JobSpec.model_validate({**fields, **extra})


def test_outputs_stored_there_are_those_stored_on_the_thread(settings, storing) -> None:  # type: ignore[no-untyped-def]
    spec = _spec(safety="block")
    images = _images(2)
    extras = Extras(mask=Image.new("L", (64, 64), 255), verdicts=[Judged(False, 0.1), Judged(True, 0.9)])
    apart = storing.store("job-apart", spec, images, extras)
    here = store_outputs(settings, open_storage(settings), "job-apart", spec, images, extras)
    assert apart == here
    assert [o["kind"] for o in apart] == ["image", "image", "mask"]
    assert apart[1]["blocked"] and apart[1]["uri"] is None  # blocked: stored nowhere
    stored = open_storage(settings).get(apart[0]["uri"])
    assert len(stored) == apart[0]["size_bytes"]


def test_an_error_there_is_raised_here_with_its_type_and_code(settings) -> None:  # type: ignore[no-untyped-def]
    missing = settings.model_copy(update={"storage_url": "s3://no-such-bucket-here/out"})
    spec, images = _spec(), _images(2)
    with pytest.raises(InferenceError) as on_thread:
        store_outputs(missing, open_storage(missing), "job-x", spec, images)
    proc = StoringProcess(missing).start()
    try:
        with pytest.raises(InferenceError) as apart:
            proc.store("job-x", spec, images)
    finally:
        proc.close()
    assert type(apart.value) is type(on_thread.value) and apart.value.code == on_thread.value.code


def test_a_killed_storing_process_releases_its_job_which_then_succeeds(  # type: ignore[no-untyped-def]
    settings, scratch_db_url, scratch_db
) -> None:
    from inference_server.engine.runner import Engine
    from workers.runner import JobRunner

    on = scratch_jobs(settings, scratch_db_url, scratch_db, "storing")
    with scratch_db() as session:
        job_id = submit(session, on.ctx, on.tenant, JobRequest.model_validate(BODY)).job_id
    storing = StoringProcess(on.settings).start()
    storage = open_storage(on.settings)
    runner = JobRunner(on.settings, scratch_db, storage, Engine(on.registry), storing=storing)
    try:
        assert storing._proc is not None
        os.kill(storing._proc.pid, signal.SIGKILL)
        storing._proc.wait(10)
        assert runner.run(job_id) == "requeued"  # queued again, as after any storage failure
        with scratch_db() as session:
            job = session.get(Job, job_id)
            assert job is not None and (job.status, job.attempts, job.error_code) == ("queued", 1, None)
        assert runner.run(job_id) == "succeeded"  # a new storing process took the retry
    finally:
        runner.close()
    assert storing._proc is None  # closed with the runner


def test_a_store_after_its_process_died_raises_storage_unavailable_then_recovers(storing) -> None:  # type: ignore[no-untyped-def]
    os.kill(storing._proc.pid, signal.SIGKILL)
    storing._proc.wait(10)
    with pytest.raises(StorageUnavailable):
        storing.store("job-y", _spec(), _images(2))
    assert len(storing.store("job-y", _spec(), _images(2))) == 2


def test_the_storing_process_ends_when_its_child_is_killed(system_env) -> None:  # type: ignore[no-untyped-def]
    script = textwrap.dedent(
        """
        import os, signal, sys
        from inference_server.settings import Settings
        from workers.storing import StoringProcess
        proc = StoringProcess(Settings()).start()
        print(proc._proc.pid, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    child = subprocess.run(
        [sys.executable, "-c", script], env=system_env, capture_output=True, text=True, timeout=120
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    pid = int(child.stdout.split()[0])
    wait_for(lambda: not _alive(pid), 30, what="the orphaned storing process to exit")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False
