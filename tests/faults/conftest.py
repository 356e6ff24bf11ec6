"""The fault suite's lab: a private PostgreSQL cluster, a private RabbitMQ node and a moto S3 server,
started once for the session (see inference_server/devtools/faults). Missing binaries fail loudly."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from inference_server.devtools.faults.lab import Lab
from inference_server.devtools.faults.scenarios import SCENARIOS


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    # FAULTS_LOGS keeps the processes' logs somewhere that outlives pytest's rotation of temp folders.
    keep = os.environ.get("FAULTS_LOGS")
    root = Path(keep) / f"lab-{os.getpid()}" if keep else tmp_path_factory.mktemp("faults-lab")
    try:
        opened = Lab.open(root)
    except Exception as exc:
        pytest.fail(
            f"the fault suite needs PostgreSQL 15 (initdb, pg_ctl) and rabbitmq-server here: {exc}",
            pytrace=False,
        )
    yield opened
    opened.close()


def run_scenario(lab: Lab, name: str) -> None:
    """Run ``name`` at the suite's size; fail with its counts, checks and log folder unless done."""
    scenario = SCENARIOS[name]
    tally = scenario.run(lab, scenario.small)
    print(tally.report())
    assert tally.done, f"{name} is not done: {'; '.join(tally.failures)}\n{tally.report()}"
