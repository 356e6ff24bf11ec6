"""The worker's heartbeat: every ``WORKER_HEARTBEAT_INTERVAL`` seconds a thread in the worker child
writes its row in ``worker_heartbeats`` (families, queues, slots, busy slots, device, free GPU
memory). The scheduler counts the slots of workers heard from within ``WORKER_HEARTBEAT_TIMEOUT``;
``GET /v1/models`` shows them.

It runs in the child because CUDA may be touched only there (``torch.cuda.mem_get_info``); busy
slots come from Celery's task signals in the same process. A heartbeat that cannot reach the
database only logs: the scheduler stops counting the worker, which is right, since it cannot record
a claim either."""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Any

from celery import signals
from sqlalchemy import delete, update
from sqlalchemy.exc import IntegrityError

from inference_server.db import WorkerHeartbeat
from inference_server.db.base import utcnow
from inference_server.settings import Settings

log = logging.getLogger(__name__)


def gpu_memory(device: str) -> tuple[int | None, int | None]:
    """(total, free) bytes of the current CUDA device; (None, None) elsewhere."""
    if not device.startswith("cuda"):
        return None, None
    import torch

    free, total = torch.cuda.mem_get_info()
    return int(total), int(free)


class Heartbeat:
    def __init__(self, settings: Settings, name: str, families: list[str], queues: list[str]) -> None:
        self.settings = settings
        self.name = name
        self.families = families
        self.queues = queues
        self.busy = 0
        self._stop = threading.Event()
        self._sf: Any = None

    def beat(self) -> None:
        """Write this worker's row now (insert it the first time)."""
        total, free = gpu_memory(self.settings.device)
        values = {
            "families": self.families,
            "queues": self.queues,
            "slots": 1,  # one job at a time per worker (one per GPU)
            "busy": self.busy,
            "device": self.settings.device,
            "gpu_memory_total": total,
            "gpu_memory_free": free,
            "last_seen": utcnow(),
        }
        with self._sf() as session:
            found = session.execute(
                update(WorkerHeartbeat).where(WorkerHeartbeat.name == self.name).values(values)
            ).rowcount  # type: ignore[attr-defined]
            if not found:
                session.add(WorkerHeartbeat(name=self.name, started_at=utcnow(), **values))
            try:
                session.commit()
            except IntegrityError:  # another child of this worker inserted it first
                session.rollback()

    def run(self) -> None:
        from inference_server.db import make_database, make_session_factory

        engine = make_database(self.settings.database_url, pool_size=1)
        self._sf = make_session_factory(engine)
        while True:
            try:
                self.beat()
            except Exception as exc:
                log.warning("worker heartbeat: %s", exc)
            if self._stop.wait(self.settings.worker_heartbeat_interval):
                break
        try:
            with self._sf() as session:  # a worker stopping warmly is offline at once
                session.execute(delete(WorkerHeartbeat).where(WorkerHeartbeat.name == self.name))
                session.commit()
        except Exception as exc:
            log.warning("worker heartbeat: %s", exc)
        engine.dispose()

    def start(self) -> None:
        threading.Thread(target=self.run, name="worker-heartbeat", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()


def install(settings: Settings, families: list[str], queues: list[str]) -> None:
    """Start a heartbeat in each worker child as it starts (and in a solo-pool worker itself).
    Called in the worker's main process before it forks: its pid and host name the worker."""
    name = f"{'-'.join(families)}.{settings.device}@{socket.gethostname()}#{os.getpid()}"
    current: dict[str, Heartbeat] = {}

    def child_started(**_: Any) -> None:
        current["beat"] = heartbeat = Heartbeat(settings, name, families, queues)
        heartbeat.start()

    def busy(delta: int) -> Any:
        def handler(**_: Any) -> None:
            if "beat" in current:
                current["beat"].busy = max(0, current["beat"].busy + delta)

        return handler

    def child_stopping(**_: Any) -> None:
        if "beat" in current:
            current["beat"].stop()

    signals.worker_process_init.connect(child_started, weak=False)
    signals.task_prerun.connect(busy(1), weak=False)
    signals.task_postrun.connect(busy(-1), weak=False)
    signals.worker_process_shutdown.connect(child_stopping, weak=False)
