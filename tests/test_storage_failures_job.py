"""A job whose outputs cannot be written fails with the storage's code, not ``internal_error``: the
real job runner, a tiny model, PostgreSQL, and file storage on a full or a read-only tmpfs. One
attempt allowed, so the first failure is the last (retries are the job runner's business)."""

from __future__ import annotations

import errno
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from inference_server.db import Job, make_database, make_session_factory
from inference_server.jobs.service import JobContext, submit
from inference_server.jobs.spec import JobRequest
from inference_server.storage.local import FileStorage
from tests.mounts import read_only, tmpfs

BODY = {"family": "sd15", "prompt": "a mill by a river", "width": 64, "height": 64, "steps": 2, "seed": 5}


@pytest.fixture(scope="module")
def world(settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:  # type: ignore[no-untyped-def]
    from api.auth import create_tenant_key
    from inference_server.engine.runner import Engine
    from inference_server.registry import load_registry
    from tests.conftest import fresh_database

    with fresh_database("is_storage_job") as url:
        engine = make_database(url)
        sf = make_session_factory(engine)
        with sf() as session:
            tenant, _ = create_tenant_key(session, f"storage-{uuid.uuid4().hex[:6]}")
            session.expunge(tenant)
        local = settings.model_copy(update={"database_url": url, "job_max_attempts": 1})
        registry = load_registry(local.models_file)
        scratch = FileStorage(tmp_path_factory.mktemp("inputs").as_uri())
        yield {
            "sf": sf,
            "settings": local,
            "ctx": JobContext(local, registry, scratch),
            "tenant": tenant,
            "engine": Engine(registry),
        }
        engine.dispose()


def fill(root: Path) -> None:
    """Write until the file system is full (unbuffered: nothing is left to fail at close)."""
    with (root / "filler").open("wb", buffering=0) as fh:
        try:
            while True:
                fh.write(os.urandom(4096))
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


def run_job(world: dict[str, Any], storage: FileStorage) -> tuple[str, Job]:
    from workers.runner import JobRunner

    with world["sf"]() as session:
        job_id = submit(session, world["ctx"], world["tenant"], JobRequest.model_validate(BODY)).job_id
    runner = JobRunner(world["settings"], world["sf"], storage, world["engine"])
    outcome = runner.run(job_id)
    with world["sf"]() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return outcome, job


def test_a_full_storage_fails_the_job_with_storage_full(world) -> None:  # type: ignore[no-untyped-def]
    with tmpfs("size=256k") as root:
        storage = FileStorage(root.as_uri())
        fill(root)
        outcome, job = run_job(world, storage)
    assert (outcome, job.status, job.error_code) == ("failed", "failed", "storage_full")
    expected = f"could not write jobs/{job.id}/outputs/0.png to file storage: No space left on device"
    assert job.error_message == expected


def test_a_read_only_storage_fails_the_job_with_storage_read_only(world) -> None:  # type: ignore[no-untyped-def]
    with tmpfs("size=1m") as root:
        storage = FileStorage(root.as_uri())
        read_only(root)
        outcome, job = run_job(world, storage)
    assert (outcome, job.status, job.error_code) == ("failed", "failed", "storage_read_only")
    assert "Read-only file system" in (job.error_message or "")
