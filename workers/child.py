"""The worker child's composition root: the one place its JobRunner (engine, storage, database) is
built from Settings. The child builds it when it starts (Celery's ``worker_process_init``, after the
launcher pinned the device, so CUDA is first touched here) and loads ``WARM_MODELS`` before it takes
its first job. When the child exits (``worker_process_shutdown``: a warm shutdown, or recycling after
``WORKER_MAX_JOBS_PER_CHILD``), ``stop`` finishes the jobs its finisher still holds."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from inference_server.errors import ConfigurationError
from inference_server.registry import Registry
from inference_server.settings import Settings

if TYPE_CHECKING:
    from workers.runner import JobRunner

log = logging.getLogger(__name__)

WarmList = list[tuple[str, str | None]]  # (family, model id or None for the family's default)


def warm_models(settings: Settings, registry: Registry, families: list[str]) -> WarmList:
    """The ``WARM_MODELS`` entries a worker for ``families`` loads. A family or model the registry
    does not know is an operator's typo, refused at start; a known family this worker does not
    serve is skipped (``workers --gpus`` gives every GPU worker the same environment)."""
    wanted: WarmList = []
    for item in filter(None, (w.strip() for w in settings.warm_models.split(","))):
        family, _, model = item.partition("/")
        spec = registry.families.get(family)
        if spec is None or (model and all(m.id != model for m in spec.models)):
            known = ", ".join(f"{f.name}/{m.id}" for f in registry.families.values() for m in f.models)
            raise ConfigurationError(
                f"WARM_MODELS names {item!r}, which the registry does not have (it has: {known})",
                code="invalid_warm_models",
            )
        if family in families:
            wanted.append((family, model or None))
    return wanted


class ChildRunner:
    """The child's JobRunner, built once and held for the child's life.

    ``start`` runs when the child starts; ``get`` builds on first use where that did not happen or
    failed (the job task then puts its job back rather than dropping it)."""

    def __init__(self, settings: Settings, warm: WarmList, families: list[str] | None = None) -> None:
        self.settings = settings
        self.warm = warm
        self.families = families or []  # with families, the child follows the runtime registry
        self._runner: JobRunner | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def start(self) -> None:
        """Build the runner and load the warm models. Never raises: a child that cannot build its
        engine stays up, logs why, and hands every job back to the queue for a healthy worker."""
        from workers.device_metrics import start_sampler

        start_sampler(self.settings.device, threading.Event())
        try:
            runner = self.get()
        except Exception as exc:
            log.critical("worker child cannot build its engine: %s", exc, exc_info=True)
            return
        for family, model in self.warm:
            try:
                runner.engine.warm(family, model)
            except Exception as exc:  # that model's jobs will fail with the reason; the rest run
                log.error("WARM_MODELS %s/%s: %s", family, model or "default", exc)
        if self.warm:
            log.info("warm: %s", ", ".join(f"{f}/{m or 'default'}" for f, m in self.warm))
        if runner.watcher is not None:
            try:
                runner.watcher.start(self._stop)
                runner.watcher.sync()  # now, rather than at the first poll
            except Exception as exc:  # the runner syncs again before each job
                log.error("runtime registry not read at start: %s", exc)

    def stop(self) -> None:
        """Finish what the runner's finisher holds (the child is exiting). Never builds a runner:
        a process that never ran a job (the prefork parent) has nothing to finish."""
        with self._lock:
            runner = self._runner
        if runner is None:
            return
        held = runner.finisher.held if runner.finisher is not None else 0
        if held:
            log.info("finishing %d job(s) before the child exits", held)
        if not runner.close(timeout=self.settings.job_end_retry_seconds + self.settings.job_lease_seconds):
            log.error("the child exits with jobs unfinished; their leases expire and they run again")

    def get(self) -> JobRunner:
        with self._lock:
            if self._runner is None:
                self._runner = build_runner(self.settings, self.families)
            return self._runner


def worker_name(settings: Settings, families: list[str]) -> str:
    """How this child names itself in placement answers and ``worker_models``: its families,
    device (and pinned GPU) and host, as the Celery node name does."""
    import os
    import socket

    device = settings.device.replace(":", "")
    gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "") if device == "cuda" else ""
    return f"{'-'.join(families)}.{device}{gpu}@{socket.gethostname()}"


def build_runner(settings: Settings, families: list[str] | None = None) -> JobRunner:
    """A JobRunner for this child: its device configured, storage opened, registry read, engine
    ready to load pipelines, a finisher of ``FINISH_IN_FLIGHT`` calls, and a small database pool
    (one job, or one batch, denoises at a time; each job in the finisher has a watcher of its
    own). With ``families``, it follows the runtime registry and answers placement requests."""
    from inference_server.db import DatabaseTimeouts, make_database, make_session_factory
    from inference_server.engine.runner import Engine
    from inference_server.registry import load_registry
    from inference_server.storage import open_storage
    from workers.batching import largest_batch
    from workers.device import configure_torch
    from workers.gate import GATE
    from workers.runner import JobRunner
    from workers.storing import StoringProcess

    device = configure_torch(settings)
    storage = open_storage(settings)
    if settings.models_file is None:
        raise ConfigurationError(
            "MODELS_FILE is not set: the worker has no models to serve", code="no_registry"
        )
    seed = load_registry(settings.models_file)
    engine = Engine(
        seed,
        device=device,
        cache_bytes=settings.engine_cache_bytes,
        max_edit_pixels=settings.engine_max_edit_pixels,
        cache_dir=settings.model_cache_dir,
        fetch=lambda uri, dest: fetch_from_bucket(settings, uri, dest),
        lora_hotswap={"on": True, "off": False}.get(settings.lora_hotswap, "auto"),
        max_loras=settings.engine_max_loras,
    )
    timeouts = DatabaseTimeouts.from_settings(settings)
    # The finisher holds calls: a batch's members go to it together.
    largest = largest_batch(seed)
    in_flight = settings.finish_in_flight
    # A side thread per job denoising (a batch's members each have one) or in the finisher, the
    # registry watcher's reads, and a claim ahead with its watcher.
    pool = 4 + largest * (1 + in_flight)
    db = make_database(settings.database_url, pool_size=pool, timeouts=timeouts)
    sf = make_session_factory(db)
    watcher = None
    if families:
        from workers.registry_watch import RegistryWatcher

        name = worker_name(settings, families)
        watcher = RegistryWatcher(sf, seed, engine, families, name, poll=settings.registry_poll_interval)
    runner = JobRunner(
        settings,
        sf,
        storage,
        engine,
        finish_in_flight=in_flight,
        ending=GATE.ending,
        watcher=watcher,
        ahead=GATE.ahead,  # a prefork child, whose main process names its next job
        storing=StoringProcess(settings).start() if in_flight and settings.storing_process else None,
    )
    if runner.ahead is not None:
        runner.ahead.read_from(GATE.next_r)
    return runner


def fetch_from_bucket(settings: Settings, uri: str, dest: Path) -> Path:
    """Fetch a model or LoRA folder from any bucket the process's credentials reach, or the one
    file an https:// source names (a model's archive, unpacked; a LoRA's .safetensors)."""
    from urllib.parse import urlparse

    from inference_server.storage.s3 import S3Storage
    from workers.url_download import fetch_url_source, is_url

    if is_url(uri):
        return fetch_url_source(settings, uri, dest)

    parsed = urlparse(uri)
    endpoint = settings.s3_endpoint_url
    if parsed.scheme == "gs":  # GCS through its S3-compatible API, as open_storage reaches it
        endpoint = endpoint or "https://storage.googleapis.com"
    store = S3Storage(
        f"{parsed.scheme}://{parsed.netloc}",
        endpoint_url=endpoint,
        region=settings.s3_region,
        scheme=parsed.scheme,
        connect_timeout=settings.storage_connect_timeout,
        read_timeout=settings.storage_read_timeout,
        max_attempts=settings.storage_max_attempts,
    )
    return store.download_tree(uri, dest)
