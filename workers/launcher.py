"""Starting workers: one Celery worker pinned to one device, or one per visible GPU."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

from inference_server.errors import DependencyDown, InvalidRequest
from inference_server.publish.topology import queue_name
from inference_server.settings import Settings
from workers.device import pin_device

log = logging.getLogger(__name__)


def _check_families(settings: Settings, families: list[str]) -> None:
    if not families:
        raise InvalidRequest("--families needs at least one family", code="invalid_families")
    if settings.models_file is None:
        raise InvalidRequest("MODELS_FILE is not set: a worker needs a model registry", code="no_registry")
    from inference_server.registry import load_registry

    registry = load_registry(settings.models_file)
    unknown = [f for f in families if f not in registry.families]
    if unknown:
        known = ", ".join(sorted(registry.families))
        raise InvalidRequest(
            f"unknown families {', '.join(unknown)} (registry has: {known})", code="unknown_family"
        )


def run_worker(settings: Settings, families: list[str], device: str, *, pool: str = "prefork") -> None:
    """Run a Celery worker in this process. The device is pinned before anything imports torch."""
    torch_device = pin_device(device)
    _check_families(settings, families)
    if torch_device == "cuda":
        _check_cuda(device)
    _check_database(settings)
    settings = settings.model_copy(update={"device": torch_device})
    if settings.worker_metrics_port:
        _prepare_multiprocess_metrics()
        from workers.metrics import serve

        serve(settings.worker_metrics_port)
    from workers.celery_app import create_celery_app

    app = create_celery_app(settings, families=families)
    name = f"{'-'.join(families)}.{device.replace(':', '')}@%h"
    if settings.broker_url.startswith(("amqp", "pyamqp")):
        _check_name_free(app, name)
    # app.Worker rather than app.worker_main, which drops the worker's exit status: a worker
    # stopped by an unrecoverable error must exit non-zero for its supervisor to restart it.
    from celery.utils.nodenames import host_format

    worker = app.Worker(
        pool_cls=pool,
        concurrency=1,
        loglevel="INFO",
        hostname=host_format(name),
        queues=[queue_name(f) for f in families],
        without_gossip=True,
        without_mingle=True,
    )
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
                    raise InvalidRequest(
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
        raise InvalidRequest(
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


def families_for_gpu(settings: Settings, memory_bytes: int) -> list[str]:
    """Families whose largest model fits a GPU with ``memory_bytes`` (offloaded models always fit)."""
    from inference_server.registry import load_registry

    assert settings.models_file is not None
    registry = load_registry(settings.models_file)
    fits = []
    for fam in registry.families.values():
        offloads = all(m.offload != "none" for m in fam.models)
        if offloads or fam.memory_gb * 1e9 <= memory_bytes * 0.95:
            fits.append(fam.name)
    return fits


def run_gpu_workers(settings: Settings, gpus: str, families: list[str] | None) -> None:
    """Spawn `inference-server worker --device cuda:N` per GPU and supervise them."""
    from workers.device import visible_gpus

    found = visible_gpus()
    if not found:
        raise InvalidRequest(
            "no CUDA GPU is visible: use `inference-server worker --device cpu`", code="no_gpu"
        )
    wanted = [g for g in found if gpus == "all" or str(g[0]) in gpus.split(",")]
    procs: list[subprocess.Popen[bytes]] = []
    for n, (index, memory) in enumerate(wanted):
        fams = [f for f in families_for_gpu(settings, memory) if not families or f in families]
        if not fams:
            log.warning("GPU %d (%.1f GB) fits no family; not starting a worker on it", index, memory / 1e9)
            continue
        cmd = [
            sys.executable,
            "-m",
            "inference_server.cli.main",
            "worker",
            "--device",
            f"cuda:{index}",
            "--families",
            ",".join(fams),
        ]
        log.info("GPU %d: %s", index, " ".join(cmd[3:]))
        env = dict(os.environ)
        if settings.worker_metrics_port:
            env["WORKER_METRICS_PORT"] = str(settings.worker_metrics_port + n)  # one port per GPU worker
        procs.append(subprocess.Popen(cmd, env=env))
    if not procs:
        raise InvalidRequest("no GPU fits any family of the registry", code="no_gpu")

    def forward(signum: int, _frame: object) -> None:
        for p in procs:
            p.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    while any(p.poll() is None for p in procs):
        time.sleep(1.0)
    sys.exit(max(p.returncode or 0 for p in procs))
