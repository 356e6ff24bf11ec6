"""Flower's Broker tab lists the family queues with their lengths when RabbitMQ's management API
is there: on a RabbitMQ node of this test's own with the management plugin on other ports (the
shared node has none), ``jobs.sd15`` holds three messages and ``jobs.flux`` none, with no worker
online, and Flower started as deploy/ and docs/deploy.md say (``--broker_api``, the families' app)
shows both with those counts, on its page and in its JSON API."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator

import pytest
import requests

from inference_server.devtools.faults.rabbitmq import PrivateRabbit
from inference_server.devtools.services import free_port
from tests.support.system import ROOT, base_env
from tests.support.waiting import wait_for

REGISTRY = """
[families.sd15]
tasks = ["txt2img"]
[[families.sd15.models]]
id = "m"
source = "nowhere"

[families.flux]
tasks = ["txt2img"]
[[families.flux.models]]
id = "m"
source = "nowhere"
"""


@pytest.fixture(scope="module")
def rabbit() -> Iterator[PrivateRabbit]:
    node = PrivateRabbit(management=True)
    try:
        node.start()
        yield node
    finally:
        node.close()


def fill_queues(rabbit: PrivateRabbit, counts: dict[str, int]) -> None:
    """Declare each queue as the relay declares it and publish ``counts[queue]`` messages to it."""
    from kombu import Connection

    from inference_server.publish.topology import job_queue

    with Connection(rabbit.url("/"), connect_timeout=10) as conn:
        producer = conn.Producer()
        for name, count in counts.items():
            queue = job_queue(name, consumer_timeout_ms=60_000)
            queue(conn.default_channel).declare()
            for n in range(count):
                producer.publish({"job": n}, exchange=queue.exchange, routing_key=name, declare=[queue])


@pytest.fixture(scope="module")
def flower(rabbit: PrivateRabbit, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    models = tmp_path_factory.mktemp("flower") / "models.toml"
    models.write_text(REGISTRY)
    fill_queues(rabbit, {"jobs.sd15": 3, "jobs.flux": 0})
    port = free_port()
    env = base_env(BROKER_URL=rabbit.url("/"), MODELS_FILE=str(models), FLOWER_UNAUTHENTICATED_API="true")
    log = models.parent / "flower.log"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "inference_server.roles.flower",
            "flower",
            "--address=127.0.0.1",
            f"--port={port}",
            f"--broker_api=http://guest:guest@127.0.0.1:{rabbit.management_port}/api/",
        ],
        env=env,
        cwd=ROOT,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"Flower exited:\n{log.read_text()[-3000:]}")
        try:
            return requests.get(f"{url}/healthcheck", timeout=2).ok
        except requests.RequestException:
            return False

    try:
        wait_for(up, 60, what="Flower")
        yield url
    finally:
        proc.terminate()
        proc.wait(20)


def row(page: str, queue: str) -> list[str]:
    """The cells of ``queue``'s row in the Broker page's queue table."""
    found = re.search(rf'<tr id="{re.escape(queue)}">(.*?)</tr>', page, re.S)
    assert found, f"{queue} is not on the Broker page"
    cells = re.findall(r"<td[^>]*>(.*?)</td>", found.group(1), re.S)
    return [re.sub(r"<[^>]+>", "", cell).strip() for cell in cells]


def test_the_broker_page_lists_every_family_queue_with_its_length(flower: str) -> None:
    # The management API's counts lag publishes by its stats interval (5 s by default).
    def counted() -> bool:
        page = requests.get(f"{flower}/broker", timeout=10).text
        return "jobs.sd15" in page and row(page, "jobs.sd15")[1] == "3"

    wait_for(counted, 30, what="Flower to show three messages on jobs.sd15")
    page = requests.get(f"{flower}/broker", timeout=10).text
    assert "No queue data is available" not in page
    name, messages, unacked, ready, consumers, _ = row(page, "jobs.sd15")
    assert (name, messages, unacked, ready, consumers) == ("jobs.sd15", "3", "0", "3", "0")
    assert row(page, "jobs.flux")[:2] == ["jobs.flux", "0"]


def test_the_queue_length_api_reports_the_same(flower: str) -> None:
    answer = requests.get(f"{flower}/api/queues/length", timeout=10)
    assert answer.status_code == 200, answer.text
    lengths = {q["name"]: q["messages"] for q in answer.json()["active_queues"]}
    assert lengths["jobs.sd15"] == 3 and lengths["jobs.flux"] == 0, lengths

