"""The worker's composition root: one Celery worker pinned to one device, consuming the registry
queues of its families. Its objects are built here (the Celery app, the job task, the child's
runner) and in workers/child.py (what the child builds when it starts); `up` reuses
``build_worker``."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

from celery import Celery, signals

from inference_server.errors import ConfigurationError, DependencyDown
from inference_server.logs import json_logs
from inference_server.registry import Registry
from inference_server.settings import Settings
from workers.device import pin_device

log = logging.getLogger(__name__)


def _registry(settings: Settings, families: list[str]) -> Registry:
    if not families:
        raise ConfigurationError("--families needs at least one family", code="invalid_families")
    if settings.models_file is None:
        raise ConfigurationError(
            "MODELS_FILE is not set: a worker needs a model registry", code="no_registry"
        )
    from inference_server.registry import load_registry

    registry = load_registry(settings.models_file)
    unknown = [f for f in families if f not in registry.families]
    if unknown:
        known = ", ".join(sorted(registry.families))
        raise ConfigurationError(
            f"unknown families {', '.join(unknown)} (registry has: {known})", code="unknown_family"
        )
    return registry


def build_worker(settings: Settings, families: list[str]) -> tuple[Celery, list[str]]:
    """The Celery app of a worker serving ``families`` and the queues it consumes: each family's
    registry queue, the one the relay publishes its jobs to. The worker's child (or, with the solo
    pool, the worker itself) builds its runner and loads WARM_MODELS as it starts."""
    from workers import heartbeat
    from workers.celery_app import create_celery_app
    from workers.child import ChildRunner, warm_models
    from workers.metrics import JOBS_FINISHED, WORKER_FAMILIES

    registry = _registry(settings, families)
    queues = [registry.family(f).queue for f in families]
    for family in families:
        WORKER_FAMILIES.labels(family).set(1)
        for status in ("succeeded", "failed", "canceled"):  # series from the start: rate() sees the first
            JOBS_FINISHED.labels(family, status)
    runner = ChildRunner(settings, warm_models(settings, registry, families), families)
    # Sent in each prefork child after the fork (and once by the solo pool): CUDA is first touched
    # there, never in the parent that forks.
    signals.worker_process_init.connect(lambda **_: runner.start(), weak=False)
    # A child finishes the jobs its finisher holds before it exits: prefork children on
    # worker_process_shutdown, the solo pool (`up`) on worker_shutdown.
    signals.worker_process_shutdown.connect(lambda **_: runner.stop(), weak=False)
    signals.worker_shutdown.connect(lambda **_: runner.stop(), weak=False)
    heartbeat.install(settings, families, queues)  # the scheduler counts this worker's slots
    return create_celery_app(settings, queues, runner), queues


def run_worker(settings: Settings, families: list[str], device: str, *, pool: str = "prefork") -> None:
    """Run a Celery worker in this process. The device is pinned before anything imports torch."""
    torch_device = pin_device(device)
    settings = settings.model_copy(update={"device": torch_device})
    if settings.worker_metrics_port:
        # Before any module defines a metric: prometheus-client picks multiprocess mode then.
        _prepare_multiprocess_metrics()
    app, queues = build_worker(settings, families)
    from workers.gate import GATE

    # The main process names the child's next job as its message arrives (workers/ahead.py); the
    # solo pool runs its job in the main process, which receives nothing meanwhile.
    GATE.ahead = pool == "prefork" and settings.claim_ahead
    if torch_device == "cuda":
        _check_cuda(device)
    _check_database(settings)
    if settings.worker_metrics_port:
        from workers.metrics import serve

        serve(settings.worker_metrics_port)
    name = f"{'-'.join(families)}.{device.replace(':', '')}@%h"
    if settings.broker_url.startswith(("amqp", "pyamqp")):
        from inference_server.publish.broker_version import check_broker_version

        check_broker_version(settings.broker_url, settings.consumer_timeout_ms)
        _check_name_free(app, name)
    # app.Worker rather than app.worker_main, which drops the worker's exit status: a worker
    # stopped by an unrecoverable error must exit non-zero for its supervisor to restart it.
    from celery.utils.nodenames import host_format

    worker = app.Worker(
        pool_cls=pool,
        concurrency=1,
        loglevel="INFO",
        hostname=host_format(name),
        queues=queues,
        without_gossip=True,
        without_mingle=True,
        quiet=json_logs(),  # Celery's banner is not a log line: a collector of JSON lines chokes on it
    )
    log.info("worker %s consuming %s", host_format(name), ", ".join(queues))
    worker.start()
    if worker.exitcode:
        log.critical("worker stopped with status %s", worker.exitcode)
        raise SystemExit(worker.exitcode)


def _check_database(settings: Settings, *, attempts: int = 3, pause: float = 2.0) -> None:
    """Refuse to start while the database cannot be used: a worker that cannot record what it runs
    would only take jobs off the queue to strand them. A few tries ride out a database that is
    starting beside the worker; then ``DependencyDown`` (exit status 1)."""
    from sqlalchemy import inspect, text
    from sqlalchemy.exc import DBAPIError
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    from inference_server.db import DatabaseTimeouts, Job, make_database

    timeouts = DatabaseTimeouts.from_settings(settings)
    engine = make_database(settings.database_url, pool_size=1, timeouts=timeouts)
    try:
        for attempt in range(1, attempts + 1):
            try:
                with engine.connect() as conn:
                    conn.execute(text("SELECT 1"))
                    migrated = inspect(conn).has_table(Job.__tablename__)
                break
            except (DBAPIError, PoolTimeout) as exc:
                reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
                if attempt == attempts:
                    raise DependencyDown(f"the database is unavailable: {reason}") from exc
                log.warning("database unavailable (%s); trying again in %.0f s", reason, pause)
                time.sleep(pause)
        if not migrated:
            raise DependencyDown(
                "the database has no job tables: run `inference-server migrate` first",
                code="database_not_migrated",
            )
    finally:
        engine.dispose()


def _check_name_free(app: Any, name: str, *, grace: float = 5.0) -> None:
    """Refuse plainly to start a second live worker under the same node name. Celery would die later
    on RabbitMQ's RESOURCE_LOCKED for the name's exclusive control queue; a predecessor that is
    still stopping gets ``grace`` seconds to let it go."""
    from amqp.exceptions import NotFound, ResourceLocked
    from celery.utils.nodenames import host_format

    node = host_format(name)
    deadline = time.monotonic() + grace
    with app.connection_for_write() as conn:
        while True:
            channel = conn.channel()
            try:
                channel.queue_declare(f"{node}.celery.pidbox", passive=True)
                return
            except NotFound:
                return
            except ResourceLocked:
                if time.monotonic() > deadline:
                    raise ConfigurationError(
                        f"a worker named {node} is already running on this broker; stop it first "
                        "(one worker per device and set of families)",
                        code="worker_running",
                    ) from None
                time.sleep(0.5)
            finally:
                with contextlib.suppress(Exception):
                    channel.close()


def _check_cuda(device: str) -> None:
    """Fail at start, with a clear message, when the pinned GPU is not there. Asked in a
    subprocess: CUDA must first be initialised in the worker child, never in this parent."""
    probe = "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)"
    if subprocess.run([sys.executable, "-c", probe], env=dict(os.environ), check=False).returncode != 0:
        raise ConfigurationError(
            f"--device {device}: no CUDA device is visible (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', '')!r}); use --device cpu on a machine without a GPU",
            code="no_gpu",
        )


def _prepare_multiprocess_metrics() -> None:
    """Give prometheus-client a fresh folder shared by this worker's processes. It must be set
    before prometheus-client is first imported here, so the child's metrics land in files the
    main process serves."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.mkdtemp(prefix="inference-worker-metrics-")
    os.makedirs(path, exist_ok=True)
    for name in os.listdir(path):  # values left by an earlier run would be summed in
        os.remove(os.path.join(path, name))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
