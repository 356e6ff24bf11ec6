"""Flower beside a RabbitMQ node that has the management plugin (``PrivateRabbit(management=True)``):
family queues filled as the relay declares them, and Flower started with ``--broker_api`` and the
families' app, as deploy/ runs it. Used by tests/test_flower_queues.py and deploy/flower_screenshot.py."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import requests

from inference_server.devtools.services import free_port

ROOT = Path(__file__).resolve().parents[2]


def fill_queues(broker_url: str, counts: dict[str, int]) -> None:
    """Declare each queue as the relay declares it and publish ``counts[queue]`` messages to it."""
    from kombu import Connection

    from inference_server.publish.topology import job_queue

    with Connection(broker_url, connect_timeout=10) as conn:
        producer = conn.Producer()
        for name, count in counts.items():
            queue = job_queue(name, consumer_timeout_ms=60_000)
            queue(conn.default_channel).declare()
            for n in range(count):
                producer.publish({"job": n}, exchange=queue.exchange, routing_key=name, declare=[queue])


def registry_file(folder: Path, families: list[str]) -> Path:
    """A registry naming ``families`` (one txt2img model each; nothing is loaded): what Flower's app reads."""
    text = "".join(
        f'[families.{f}]\ntasks = ["txt2img"]\n[[families.{f}.models]]\nid = "m"\nsource = "none"\n\n'
        for f in families
    )
    path = folder / "models.toml"
    path.write_text(text)
    return path


def start_flower(
    broker_url: str, management_url: str, models_file: Path, log: Path, env: dict[str, str]
) -> tuple[subprocess.Popen[bytes], str]:
    """``celery -A inference_server.roles.flower flower`` on a free port; returns it and its URL
    once ``/healthcheck`` answers. ``management_url`` is the management API's ``.../api/``."""
    port = free_port()
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
            f"--broker_api={management_url}",
        ],
        env=dict(env, BROKER_URL=broker_url, MODELS_FILE=str(models_file)),
        cwd=ROOT,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"Flower exited:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            if requests.get(f"{url}/healthcheck", timeout=2).ok:
                return proc, url
        except requests.RequestException:
            pass
        time.sleep(0.3)
    proc.terminate()
    raise RuntimeError(f"Flower did not answer within 60 s:\n{log.read_text(errors='replace')[-3000:]}")


def broker_rows(page: str) -> dict[str, list[str]]:
    """The queue table of Flower's Broker page: queue name -> its cells as text (queue, messages,
    unacked, ready, consumers, idle since); ``—`` where the management API gave no figure yet."""
    import html
    import re

    rows = {}
    for body in re.findall(r'<tr id="[^"]*">(.*?)</tr>', page, re.S):
        found = re.findall(r"<td[^>]*>(.*?)</td>", body, re.S)
        cells = [html.unescape(re.sub(r"<[^>]+>", "", c)).strip() for c in found]
        if cells:
            rows[cells[0]] = cells
    return rows
