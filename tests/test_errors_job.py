"""A job that fails on a bug says "an internal error occurred" and the exception's class, never the
exception's text; the detail goes to the worker's log. Run by the real job runner, engine and
PostgreSQL; the bug is a storage write that raises an error whose text holds an object repr."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from inference_server.db import Job, make_database, make_session_factory
from inference_server.engine.runner import Engine
from inference_server.jobs.service import JobContext, submit
from inference_server.jobs.spec import JobRequest
from inference_server.registry import load_registry
from inference_server.storage import open_storage
from tests.conftest import fresh_database

BODY = {"family": "sd15", "prompt": "a kettle", "width": 64, "height": 64, "steps": 2, "seed": 3}


def test_a_crash_fails_the_job_with_internal_error_and_no_exception_text(settings, caplog) -> None:  # type: ignore[no-untyped-def]
    from api.auth import create_tenant_key
    from workers.runner import JobRunner

    with fresh_database("is_errors_job") as url:
        db = make_database(url)
        sf = make_session_factory(db)
        local = settings.model_copy(update={"database_url": url})
        registry = load_registry(local.models_file)
        with sf() as session:
            tenant, _ = create_tenant_key(session, f"errors-{uuid.uuid4().hex[:6]}")
            ctx = JobContext(local, registry, open_storage(local))
            job_id = submit(session, ctx, tenant, JobRequest.model_validate(BODY)).job_id
        runner = JobRunner(local, sf, open_storage(local), Engine(registry))
        marker = object()

        def broken_put(*args: Any, **kwargs: Any) -> str:
            raise RuntimeError(f"bookkeeping lost track of {marker!r}")

        runner.storage.put = broken_put  # type: ignore[method-assign]
        with caplog.at_level(logging.ERROR, logger="workers.runner"):
            assert runner.run(job_id) == "failed"
        with sf() as session:
            job = session.get(Job, job_id)
            assert job is not None
            assert (job.status, job.error_code) == ("failed", "internal_error")
            assert job.error_message == "an internal error occurred (RuntimeError)"
        # The detail an operator needs is in the log.
        assert repr(marker) in caplog.text
        db.dispose()
