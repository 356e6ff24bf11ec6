"""Every fault scenario, by name, with the size the test suite runs it at and the benchmark's size.
A scenario is a function ``(lab, size) -> Tally``: it runs as a tenant of the lab's system (or of one
of its own) and mends what it broke."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from inference_server.devtools.faults.lab import Lab
from inference_server.devtools.faults.scenarios import dependencies, messages, processes, webhooks
from inference_server.devtools.faults.tally import Tally


@dataclass(frozen=True)
class Scenario:
    name: str
    run: Callable[[Lab, int], Tally]
    small: int  # jobs in the test suite
    large: int  # jobs in benchmarks/faults.py


SCENARIOS = {
    s.name: s
    for s in [
        Scenario("worker_child_sigkill", processes.worker_child_sigkill, 4, 12),
        Scenario("worker_main_sigkill", processes.worker_main_sigkill, 3, 9),
        Scenario("worker_sigterm", processes.worker_sigterm, 3, 10),
        Scenario("broker_restart", dependencies.broker_restart, 30, 500),
        Scenario("pg_restart", dependencies.pg_restart, 30, 500),
        Scenario("pg_outage", dependencies.pg_outage, 4, 12),
        Scenario("storage_down", dependencies.storage_down, 6, 30),
        Scenario("storage_blips", dependencies.storage_blips, 20, 100),
        Scenario("worker_db_partition", dependencies.worker_db_partition, 3, 10),
        Scenario("long_job", processes.long_job, 1, 2),
        Scenario("poison_message", messages.poison_message, 5, 50),
        Scenario("killer_job", processes.killer_job, 3, 20),
        Scenario("receiver_down", webhooks.receiver_down, 5, 50),
        Scenario("dispatcher_kill", webhooks.dispatcher_kill, 10, 100),
        Scenario("api_db_blackhole", dependencies.api_db_blackhole, 4, 50),
    ]
}
