"""A client generated from the live API's OpenAPI document by a standard generator
(openapi-python-client) imports and works: a job submitted through it comes back as its typed
``JobView`` (status an enum, progress a model), the families are an enum of the served ones, and
an error answer is parsed into the typed ``ErrorResponse`` with its code."""

from __future__ import annotations

import importlib
import subprocess
import sys
from collections.abc import Iterator
from types import ModuleType

import pytest
import requests

PACKAGE = "inference_generated_client"


@pytest.fixture(scope="module")
def generated(api_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleType]:
    folder = tmp_path_factory.mktemp("generated")
    document = folder / "openapi.json"
    document.write_bytes(requests.get(f"{api_server}/openapi.json", timeout=10).content)
    config = folder / "config.yaml"
    config.write_text(f"post_hooks: []\npackage_name_override: {PACKAGE}\n")
    run = subprocess.run(
        [sys.executable, "-m", "openapi_python_client", "generate", "--path", str(document)]
        + ["--config", str(config), "--meta", "none", "--output-path", str(folder / PACKAGE)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Warning" not in run.stdout + run.stderr, run.stdout + run.stderr  # every schema understood
    sys.path.insert(0, str(folder))
    try:
        yield importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(folder))
        for name in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
            del sys.modules[name]


def test_a_generated_client_submits_and_reads_typed_jobs(
    generated: ModuleType, api_server: str, tenant  # type: ignore[no-untyped-def]
) -> None:
    submit = importlib.import_module(f"{PACKAGE}.api.jobs.submit_job")
    get_job = importlib.import_module(f"{PACKAGE}.api.jobs.get_job")
    models = importlib.import_module(f"{PACKAGE}.models")
    family = models.JobRequestFamily("sd15")  # the served families are an enum in the document
    assert {f.value for f in models.JobRequestFamily} >= {"sd15", "sdxl", "flux"}
    client = generated.AuthenticatedClient(base_url=api_server, token=tenant.api_key)
    with client as http:
        body = models.JobRequest(family=family, prompt="a generated client", width=64, height=64, steps=4)
        job = submit.sync(client=http, body=body, idempotency_key="generated-1")
        assert isinstance(job, models.JobView), job
        assert job.status in (models.JobStatus.QUEUED, models.JobStatus.RUNNING, models.JobStatus.SUCCEEDED)
        assert job.task == models.Task.TXT2IMG and isinstance(job.progress, models.Progress)
        again = get_job.sync(job_id=job.id, client=http)
        assert isinstance(again, models.JobView) and again.id == job.id
        missing = get_job.sync(job_id="no-such-job", client=http)
        assert isinstance(missing, models.ErrorResponse)
        assert missing.error.code == "job_not_found"
