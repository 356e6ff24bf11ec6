"""The broker, PostgreSQL and storage failing under the running system (see
inference_server/devtools/faults/scenarios/dependencies.py for each scenario's steps and checks)."""

from __future__ import annotations

import pytest

from tests.faults.conftest import run_scenario

pytestmark = pytest.mark.faults


def test_broker_restart_under_load(lab):
    run_scenario(lab, "broker_restart")


def test_postgres_restart_under_load(lab):
    run_scenario(lab, "pg_restart")


def test_postgres_down_while_jobs_run(lab):
    run_scenario(lab, "pg_outage")


def test_storage_down(lab):
    run_scenario(lab, "storage_down")


def test_storage_blips(lab):
    run_scenario(lab, "storage_blips")


def test_worker_to_database_partition(lab):
    run_scenario(lab, "worker_db_partition")


def test_api_with_a_blackholed_database_answers_503_fast(lab):
    run_scenario(lab, "api_db_blackhole")
