"""The job task. Its argument is a job id; everything else is read from the database. The runner
(and with it torch and the pipelines) is built in the worker child on its first job."""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import Celery, Task

from inference_server.errors import ConfigurationError
from inference_server.settings import Settings

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

    @app.task(name="inference.run_job", bind=True, acks_late=True, max_retries=None)
    def run_job(self: Task, job_id: str) -> str:
        from workers.runner import RetryLater

        # A retry of ours resumes a job this worker left running, as a broker redelivery does.
        redelivered = bool((self.request.delivery_info or {}).get("redelivered")) or self.request.retries > 0
        try:
            runner = lazy.get()
        except Exception as exc:
            # This worker cannot run anything (device, registry, storage): the job is not at fault.
            # Put it back on its queue for a healthy worker rather than acking it away.
            log.critical("worker cannot start its engine: %s", exc, exc_info=True)
            raise self.retry(countdown=10, exc=exc) from exc
        try:
            outcome = runner.run(job_id, redelivered=redelivered)
        except RetryLater as exc:
            log.warning("job %s: transient failure, retrying: %s", job_id, exc)
            raise self.retry(countdown=5, exc=exc) from exc
        log.info("job %s: %s", job_id, outcome)
        return outcome
