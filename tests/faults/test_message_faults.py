"""Poison messages end in a visible dead-letter queue (see
inference_server/devtools/faults/scenarios/messages.py)."""

from __future__ import annotations

import pytest

from tests.faults.conftest import run_scenario

pytestmark = pytest.mark.faults


def test_poison_messages_are_dead_lettered_once(lab):
    run_scenario(lab, "poison_message")
