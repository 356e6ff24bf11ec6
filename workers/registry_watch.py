"""The worker child's view of the runtime registry, and its side of warm placement.

Between jobs the child keeps its engine's registry current (the seed file plus every runtime
model and LoRA), evicts what was deleted, answers placement requests for its families, and
reports what its pipeline cache holds (``worker_models``). A side thread polls the registry
version every REGISTRY_POLL_INTERVAL; it shares one lock with the job runner, so a load never runs
beside a job: a request that arrives during a job is answered when the job ends. A claimed job
whose model or LoRA the engine does not know reads the registry again first, so a job for a model
added a moment ago finds it.

A poll is one primary-key read; the rows are read again only when the version moved."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from inference_server.errors import InferenceError, public_reason
from inference_server.registry import Registry, placement
from inference_server.registry.runtime import EVERYONE, merge, read_rows, read_version
from workers.priority import yield_to_device

log = logging.getLogger(__name__)


class RegistryWatcher:
    """Keeps ``engine`` on the current registry and answers placement requests as ``worker``."""

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        seed: Registry,
        engine: Any,
        families: list[str],
        worker: str,
        *,
        poll: float = 1.0,
    ) -> None:
        self.sf = session_factory
        self.seed = seed
        self.engine = engine
        self.families = families
        self.worker = worker
        self.poll = poll
        self.lock = threading.RLock()  # held by a job's whole run, and by every sync
        self._version = -1
        self._after = 0  # the newest placement request seen
        self._reported: set[tuple[str, str]] | None = None
        self._thread: threading.Thread | None = None

    def start(self, stop: threading.Event) -> None:
        """Forget this worker's earlier reports, skip requests older than now, start polling."""
        with self.sf() as session:
            placement.forget(session, self.worker)
            self._after = placement.latest_request(session)
        self._reported = set()
        self._thread = threading.Thread(target=self._loop, args=(stop,), name="registry-watch", daemon=True)
        self._thread.start()

    def _loop(self, stop: threading.Event) -> None:
        yield_to_device()
        while not stop.wait(self.poll):
            try:
                self.sync()
            except Exception as exc:  # the database may be away; the next poll tries again
                log.warning("registry poll failed: %s", public_reason(exc))

    def sync(self) -> None:
        """Read the registry again if it changed, then answer new placement requests and report
        what is loaded. Safe to call from the job's thread (the lock is reentrant)."""
        with self.lock:
            with self.sf() as session:
                version = read_version(session)
                if version == self._version:
                    self.report()
                    return
                rows = read_rows(session)
                requests = placement.pending(session, self.families, self._after)
            evicted = self.engine.set_registry(merge(self.seed, rows, EVERYONE))
            if evicted:
                log.info("evicted deleted models: %s", ", ".join(f"{f}/{m}" for f, m in evicted))
            self._version = rows.version
            for req in requests:
                self._answer(req)
                self._after = max(self._after, int(req.id))
            self.report()

    def knows(self, family: str, model_id: str, loras: list[str]) -> bool:
        """Whether the engine's registry has ``family``'s model ``model_id`` and every LoRA named
        in ``loras`` (a LoRA given by its URI needs no entry)."""
        spec = self.engine.registry.families.get(family)
        if spec is None or all(m.id != model_id for m in spec.models):
            return False
        return all("://" in name or spec.lora(name) is not None for name in loras)

    def _answer(self, req: Any) -> None:
        started = time.perf_counter()
        code = message = None
        try:
            if req.action == placement.LOAD:
                self.engine.warm(req.family, req.model_id)
                status = "loaded"
            else:
                self.engine.unload(req.family, req.model_id)
                status = "unloaded"
        except Exception as exc:
            status = "failed"
            code = exc.code if isinstance(exc, InferenceError) else "model_error"
            message = public_reason(exc)
            log.error("placement %s %s/%s failed: %s", req.action, req.family, req.model_id, message)
        seconds = time.perf_counter() - started
        with self.sf() as session:
            placement.answer(session, int(req.id), self.worker, status, seconds, code=code, message=message)
        log.info("placement %s %s/%s: %s in %.2f s", req.action, req.family, req.model_id, status, seconds)

    def report(self) -> None:
        """Write what the pipeline cache holds, when it changed since the last report."""
        loaded = self.engine.loaded()
        if loaded == self._reported:
            return
        with self.sf() as session:
            placement.report_loaded(session, self.worker, loaded)
        self._reported = loaded
