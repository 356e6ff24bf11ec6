"""Webhooks through the running system: a receiver that takes 20 s to answer delays neither its job
nor another receiver's deliveries."""

from __future__ import annotations

import time

from tests.support.jobs import submit, wait_done
from tests.support.waiting import wait_for

BODY = {"family": "sd15", "prompt": "a quiet street", "width": 64, "height": 64, "steps": 4, "seed": 5}


def test_slow_receiver_delays_neither_its_job_nor_others(
    api_client, worker, dispatcher, receiver, make_receiver
):
    slow = make_receiver(lambda n, req: (200, {}, 20.0))
    t0 = time.monotonic()
    job = submit(api_client, {**BODY, "webhook": {"url": slow.url}})
    done = wait_done(api_client, job["id"], timeout=60)
    job_seconds = time.monotonic() - t0
    assert done["status"] == "succeeded"
    # The job finished while its receiver was still sitting on the first event.
    assert job_seconds < 15, job_seconds
    other = submit(api_client, {**BODY, "webhook": {"url": receiver.url}})
    wait_done(api_client, other["id"], timeout=60)
    wait_for(
        lambda: "job.succeeded" in receiver.types(other["id"]),
        15,
        what="the fast receiver's job.succeeded while the slow one hangs",
    )
    assert time.monotonic() - t0 < 20  # all of this happened inside the slow receiver's first answer
