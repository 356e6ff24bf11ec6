"""Schemathesis against the live API's own OpenAPI document, on PostgreSQL, with a valid key: the
examples, coverage, fuzzing and stateful phases (the stateful one follows the document's links from
``POST /v1/jobs``), at least a thousand cases, no server error and every answer as the document
says (status declared, body matching its schema, content type, headers).

The API runs on a database and a broker vhost of this module's own, so the jobs schemathesis
submits (any size the schema allows) never reach the suite's workers."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from inference_server.devtools import services
from tests.support.system import start_api

CHECKS = ",".join(
    (
        "not_a_server_error",
        "response_schema_conformance",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
    )
)
MIN_CASES = 1000
# A long-poll on a job no worker runs holds its request for the whole wait: keep them short.
# The tenant's event stream never ends by design (tests/test_streams.py covers it).
CONFIG = """
[[operations]]
include-name = "GET /v1/jobs/{job_id}"
parameters = { "query.wait" = 0.2 }

[[operations]]
include-name = "GET /v1/events"
enabled = false
"""


@pytest.fixture(scope="module")
def fuzzed_api(system_env: dict[str, str], scratch_db_url: str, logs_dir: Path) -> Iterator[tuple[str, str]]:
    from api.auth import create_tenant_key
    from inference_server.db import make_database, make_session_factory

    engine = make_database(scratch_db_url)
    with make_session_factory(engine)() as session:
        _, key = create_tenant_key(session, "schemathesis")
    engine.dispose()
    broker = os.environ.get("TEST_BROKER_URL", services.DEFAULT_BROKER)  # as tests/conftest.py
    with services.private_vhost("is_st", broker) as vhost:
        env = dict(system_env, DATABASE_URL=scratch_db_url, BROKER_URL=vhost)
        proc, url = start_api(env, logs_dir, name="api-schemathesis")
        yield url, key
        proc.kill(15)
        log = proc.output()
        assert "Traceback" not in log, proc.tail(80)


def test_schemathesis_finds_no_server_error_and_no_schema_mismatch(
    fuzzed_api: tuple[str, str], tmp_path: Path
) -> None:
    url, key = fuzzed_api
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "--config-file",
            str(config),
            "run",
            f"{url}/openapi.json",
            "--header",
            f"Authorization: Bearer {key}",
            "--phases",
            "examples,coverage,fuzzing,stateful",
            "--checks",
            CHECKS,
            "--max-examples",
            "50",
            "--seed",
            "16",
            "--workers",
            "2",
            "--generation-database",
            "none",
            "--request-timeout",
            "70",
            "--no-color",
        ],
        capture_output=True,
        text=True,
        timeout=400,
        cwd=tmp_path,  # schemathesis keeps a cache folder where it runs
    )
    print(run.stdout[-4000:])
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    for phase in ("Coverage", "Fuzzing", "Stateful"):
        assert re.search(rf"✅ {phase}\b", run.stdout), f"the {phase} phase did not pass"
    assert "Scenarios:" in run.stdout  # the stateful phase ran scenarios through the links
    cases = count_cases(run.stdout)
    print(f"schemathesis ran {cases} cases")
    assert cases >= MIN_CASES, f"only {cases} cases"


def count_cases(output: str) -> int:
    """The number of test cases schemathesis's summary reports, over every phase."""
    found = re.search(r"Test cases:\s+(\d+) generated", output)
    assert found, output[-3000:]
    return int(found.group(1))
