"""Every terminal webhook arrives, under one id, through a receiver outage and a dispatcher kill (see
inference_server/devtools/faults/scenarios/webhooks.py)."""

from __future__ import annotations

import pytest

from tests.faults.conftest import run_scenario

pytestmark = pytest.mark.faults


def test_receiver_down_then_back(lab):
    run_scenario(lab, "receiver_down")


def test_dispatcher_killed_mid_delivery(lab):
    run_scenario(lab, "dispatcher_kill")
