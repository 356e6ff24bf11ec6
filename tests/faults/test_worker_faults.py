"""Workers killed, stopped or outlived by their jobs: every accepted job ends once (see
inference_server/devtools/faults/scenarios/processes.py for each scenario's steps and checks)."""

from __future__ import annotations

import pytest

from tests.faults.conftest import run_scenario

pytestmark = pytest.mark.faults


def test_worker_child_sigkill_mid_job(lab):
    run_scenario(lab, "worker_child_sigkill")


def test_worker_main_sigkill_mid_job(lab):
    run_scenario(lab, "worker_main_sigkill")


def test_worker_sigterm_mid_job(lab):
    run_scenario(lab, "worker_sigterm")


def test_job_that_kills_its_worker_fails_too_many_attempts(lab):
    run_scenario(lab, "killer_job")


def test_job_longer_than_the_consumer_timeout(lab):
    run_scenario(lab, "long_job")
