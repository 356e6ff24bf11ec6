"""The job task. Its argument is a job id; everything else is read from the database. The runner
(and with it torch and the pipelines) is built in the worker child on its first job."""

from __future__ import annotations

import logging
import threading
import uuid
from typing import Any

from celery import Celery, Task

from inference_server.errors import ConfigurationError
from inference_server.jobs.enums import ClaimRefusal
from inference_server.publish.topology import RUN_JOB
from inference_server.settings import Settings
from workers import messages
from workers.runner import ClaimUnavailable

log = logging.getLogger(__name__)


class _Lazy:
    """The child's runner, built once on first use (after the launcher pinned the device)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._runner: Any = None
        self._lock = threading.Lock()

    def get(self) -> Any:
        with self._lock:
            if self._runner is None:
                self._runner = build_runner(self.settings)
            return self._runner


def build_runner(settings: Settings) -> Any:
    from inference_server.db import make_database, make_session_factory
    from inference_server.engine.runner import Engine
    from inference_server.registry import load_registry
    from inference_server.storage import open_storage
    from workers.device import configure_torch
    from workers.runner import JobRunner

    device = configure_torch(settings)
    storage = open_storage(settings)
    if settings.models_file is None:
        raise ConfigurationError(
            "MODELS_FILE is not set: the worker has no models to serve", code="no_registry"
        )
    registry = load_registry(settings.models_file)
    engine = Engine(
        registry,
        device=device,
        cache_bytes=settings.engine_cache_bytes,
        max_edit_pixels=settings.engine_max_edit_pixels,
        cache_dir=settings.model_cache_dir,
        fetch=lambda uri, dest: storage_download(settings, uri, dest),
    )
    for item in filter(None, (w.strip() for w in settings.warm_models.split(","))):
        family, _, model = item.partition("/")
        engine.warm(family, model or None)
    db = make_database(settings.database_url, pool_size=2)
    return JobRunner(settings, make_session_factory(db), storage, engine)


def storage_download(settings: Settings, uri: str, dest: Any) -> Any:
    """Fetch a model or LoRA folder from any bucket the process's credentials reach."""
    from urllib.parse import urlparse

    from inference_server.storage.s3 import S3Storage

    parsed = urlparse(uri)
    store = S3Storage(
        f"{parsed.scheme}://{parsed.netloc}",
        endpoint_url=settings.s3_endpoint_url,
        region=settings.s3_region,
        scheme=parsed.scheme,
    )
    return store.download_tree(uri, dest)


def register_tasks(app: Celery, settings: Settings) -> None:
    lazy = _Lazy(settings)
    app.conf.inference_runner = lazy  # tests and `up` reach the runner through the app

    @app.task(name=RUN_JOB, bind=True, acks_late=True, Request="workers.gate:LeasedRequest")
    def run_job(self: Task, job_id: Any) -> str:
        # The message was acknowledged as this run started (workers.gate): from here the job's
        # lease carries it, and nothing may leave the job without a way back to its queue.
        queue = (self.request.delivery_info or {}).get("routing_key") or ""
        if not _is_job_id(job_id):
            messages.dead_letter(self.app, {"args": [job_id]}, reason="not_a_job_id", queue=queue)
            return "dead-lettered"
        try:
            runner = lazy.get()
        except Exception as exc:
            # This worker cannot run anything (device, registry, storage): the job is not at fault.
            log.critical("worker cannot start its engine: %s", exc, exc_info=True)
            messages.send_back(self.app, job_id, queue, reason="engine_unavailable", pause=10.0)
            return "sent back"
        try:
            outcome = runner.run(job_id)
        except ClaimUnavailable as exc:
            log.warning("job %s: %s; its message goes back to %s", job_id, exc, queue)
            messages.send_back(self.app, job_id, queue, reason="database_unavailable", pause=2.0)
            return "sent back"
        if outcome == ClaimRefusal.MISSING:
            messages.dead_letter(self.app, {"args": [job_id]}, reason="unknown_job", queue=queue)
        log.info("job %s: %s", job_id, outcome.value)
        return outcome.value


def _is_job_id(value: Any) -> bool:
    try:
        return isinstance(value, str) and str(uuid.UUID(value)) == value
    except ValueError:
        return False
