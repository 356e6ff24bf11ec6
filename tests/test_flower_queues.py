"""Flower's Broker tab lists the family queues with their lengths when RabbitMQ's management API
is there: on a RabbitMQ node of this test's own with the management plugin on other ports (the
shared node has none), ``jobs.sd15`` holds three messages and ``jobs.flux`` none, with no worker
online, and Flower started as deploy/ and docs/deploy.md say (``--broker_api``, the families' app)
shows both with those counts, on its page and in its JSON API."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests

from inference_server.devtools.faults.rabbitmq import PrivateRabbit
from inference_server.devtools.flower import broker_rows, fill_queues, registry_file, start_flower
from tests.support.system import base_env
from tests.support.waiting import wait_for

FAMILIES = ["sd15", "flux"]


@pytest.fixture(scope="module")
def rabbit() -> Iterator[PrivateRabbit]:
    node = PrivateRabbit(management=True)
    try:
        node.start()
        yield node
    finally:
        node.close()


@pytest.fixture(scope="module")
def flower(rabbit: PrivateRabbit, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("flower")
    fill_queues(rabbit.url("/"), {"jobs.sd15": 3, "jobs.flux": 0})
    proc, url = start_flower(
        rabbit.url("/"),
        f"http://guest:guest@127.0.0.1:{rabbit.management_port}/api/",
        registry_file(folder, FAMILIES),
        folder / "flower.log",
        base_env(FLOWER_UNAUTHENTICATED_API="true"),
    )
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(20)


def test_the_broker_page_lists_every_family_queue_with_its_length(flower: str) -> None:
    # The management API's counts lag publishes by its stats interval (5 s by default).
    def counted() -> bool:
        rows = broker_rows(requests.get(f"{flower}/broker", timeout=10).text)
        return all(rows.get(q, ["", "—"])[1] != "—" for q in ("jobs.sd15", "jobs.flux"))

    wait_for(counted, 30, what="Flower to show counts for jobs.sd15 and jobs.flux")
    page = requests.get(f"{flower}/broker", timeout=10).text
    assert "No queue data is available" not in page
    rows = broker_rows(page)
    name, messages, unacked, ready, consumers, _ = rows["jobs.sd15"]
    assert (name, messages, unacked, ready, consumers) == ("jobs.sd15", "3", "0", "3", "0")
    assert rows["jobs.flux"][:2] == ["jobs.flux", "0"]


def test_the_queue_length_api_reports_the_same(flower: str) -> None:
    answer = requests.get(f"{flower}/api/queues/length", timeout=10)
    assert answer.status_code == 200, answer.text
    lengths = {q["name"]: q["messages"] for q in answer.json()["active_queues"]}
    assert lengths["jobs.sd15"] == 3 and lengths["jobs.flux"] == 0, lengths

