"""A screenshot of Flower's Broker tab in headless Chromium, and a check that the page names the
family queues. Run by hand (the suite does not need Chromium: tests/test_flower_queues.py checks
the same page's text):

    python deploy/flower_screenshot.py --url http://127.0.0.1:5555 -o /tmp/flower.png
    python deploy/flower_screenshot.py --demo -o /tmp/flower.png   # Flower of its own, see below

``--demo`` starts a RabbitMQ node of its own with the management plugin on free ports (never the
machine's shared node), fills ``jobs.sd15``, ``jobs.sdxl`` and ``jobs.flux`` with a few messages,
starts Flower as deploy/ runs it (``--broker_api``, the families' app), and stops both at the end.
Needs ``chromium`` (Debian: ``apt-get install chromium``). Exits 1 if a queue is not on the page."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import requests

DEMO_QUEUES = {"jobs.sd15": 7, "jobs.sdxl": 2, "jobs.flux": 0}


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    sys.exit("no Chromium found: apt-get install chromium")


def screenshot(page: str, out: Path, *, basic_auth: str | None = None) -> None:
    """Chromium's headless screenshot of ``page`` into ``out`` (PNG)."""
    if basic_auth:
        scheme, rest = page.split("://", 1)
        page = f"{scheme}://{basic_auth}@{rest}"
    args = [
        chromium(),
        "--headless",
        "--no-sandbox",  # root in a container has no user namespace for the sandbox
        "--disable-gpu",
        "--hide-scrollbars",
        "--window-size=1280,720",
        "--virtual-time-budget=5000",  # lets the page's scripts render the table first
        f"--screenshot={out}",
        page,
    ]
    subprocess.run(args, check=True, capture_output=True, timeout=120)


def wait_for_counts(page: str, queues: list[str], auth: tuple[str, str] | None) -> dict[str, list[str]]:
    """The Broker page's rows once every queue in ``queues`` has a message count (the management
    API has figures only after its first statistics interval), or as they are after 30 s."""
    from inference_server.devtools.flower import broker_rows

    deadline = time.monotonic() + 30
    while True:
        rows = broker_rows(requests.get(page, auth=auth, timeout=30).text)
        if all(rows.get(q, ["", "—"])[1] != "—" for q in queues) or time.monotonic() > deadline:
            return rows
        time.sleep(1)


@contextlib.contextmanager
def demo_flower() -> Iterator[str]:
    """Flower on a private RabbitMQ node with the management plugin, its queues filled."""
    from inference_server.devtools.faults.rabbitmq import PrivateRabbit
    from inference_server.devtools.flower import fill_queues, registry_file, start_flower

    folder = Path(tempfile.mkdtemp(prefix="flower-demo-"))
    node = PrivateRabbit(management=True)
    proc = None
    try:
        node.start()
        fill_queues(node.url("/"), DEMO_QUEUES)
        families = [q.removeprefix("jobs.") for q in DEMO_QUEUES]
        proc, url = start_flower(
            node.url("/"),
            f"http://guest:guest@127.0.0.1:{node.management_port}/api/",
            registry_file(folder, families),
            folder / "flower.log",
            dict(os.environ),
        )
        yield url
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(20)
        node.close()
        shutil.rmtree(folder, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running Flower, e.g. http://127.0.0.1:5555")
    where.add_argument("--demo", action="store_true", help="start a RabbitMQ and a Flower of its own")
    parser.add_argument("-o", "--output", type=Path, default=Path("/tmp/flower-broker.png"))
    parser.add_argument("--queues", default=",".join(DEMO_QUEUES), help="queues the page must name")
    parser.add_argument("--basic-auth", help="user:password, if Flower asks for it")
    opts = parser.parse_args()
    queues = [q for q in opts.queues.split(",") if q]
    auth = tuple(opts.basic_auth.split(":", 1)) if opts.basic_auth else None
    with demo_flower() if opts.demo else contextlib.nullcontext(opts.url) as url:
        page = f"{url.rstrip('/')}/broker"
        rows = wait_for_counts(page, queues, auth)  # type: ignore[arg-type]
        screenshot(page, opts.output.resolve(), basic_auth=opts.basic_auth)
    print(f"wrote {opts.output} ({opts.output.stat().st_size} bytes) of {page}")
    for name, cells in sorted(rows.items()):
        print(f"  {name}: {cells[1]} messages, {cells[3]} ready, {cells[4]} consumers")
    missing = [q for q in queues if q not in rows]
    if missing:
        print(f"the Broker page does not name: {', '.join(missing)}", file=sys.stderr)
        return 1
    print(f"the Broker page names {', '.join(queues)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
