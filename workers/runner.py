"""Running one job: claim it, run the pipeline with progress and cancellation, post-process, upload,
and record outputs and success together. A redelivered job restarts cleanly; success is recorded
at most once because every write is conditional on this attempt still owning a running job."""

from __future__ import annotations

import hashlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from PIL import Image
from sqlalchemy import CursorResult, update
from sqlalchemy.orm import Session, noload, sessionmaker

from inference_server.db import Job, JobOutput
from inference_server.db.base import utcnow
from inference_server.errors import DependencyDown, InferenceError, JobCanceled, StorageError
from inference_server.events import emit
from inference_server.jobs.status import TERMINAL, EventType, JobStatus
from inference_server.settings import Settings
from inference_server.storage.base import Storage, output_key
from workers.metrics import JOB_DURATION, JOB_WAIT, JOBS_FINISHED
from workers.progress import ProgressWatcher

log = logging.getLogger(__name__)

TRANSIENT = (StorageError, DependencyDown)
EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}


class RetryLater(Exception):
    """A transient failure: the task should be retried (the job stays running)."""

    def __init__(self, error: InferenceError) -> None:
        super().__init__(error.message)
        self.error = error


@dataclass
class Claim:
    job_id: str
    attempt: int
    family: str
    model: str | None
    task: str
    params: dict[str, Any]


class JobRunner:
    """Runs jobs in a worker child. Holds the engine (and its pipeline cache) for the child's life."""

    def __init__(
        self,
        settings: Settings,
        session_factory: sessionmaker[Session],
        storage: Storage,
        engine: Any,
    ) -> None:
        self.settings = settings
        self.sf = session_factory
        self.storage = storage
        self.engine = engine

    # -- lifecycle -------------------------------------------------------------------------------

    def run(self, job_id: str, *, redelivered: bool) -> str:
        """Run ``job_id``; return the outcome (for logs). Raises RetryLater on transient failures."""
        claim = self._claim(job_id, redelivered=redelivered)
        if isinstance(claim, str):
            return claim
        started = time.perf_counter()
        outcome = self._run_claimed(claim)
        JOB_DURATION.labels(claim.family, claim.task).observe(time.perf_counter() - started)
        if outcome in ("succeeded", "failed", "canceled"):
            JOBS_FINISHED.labels(claim.family, outcome).inc()
        return outcome

    def _run_claimed(self, claim: Claim) -> str:
        job_id = claim.job_id
        try:
            images = self._generate(claim)
            outputs = self._store_outputs(claim, images)
        except JobCanceled:
            return "canceled"
        except TRANSIENT as exc:
            if claim.attempt < self.settings.job_max_attempts:
                raise RetryLater(exc) from exc
            self._fail(claim, exc.code, exc.message)
            return "failed"
        except InferenceError as exc:
            self._fail(claim, exc.code, exc.message)
            return "failed"
        except Exception as exc:  # a bug or a runtime error in a model: the job fails with a reason
            log.exception("job %s crashed", job_id)
            self._fail(claim, "internal_error", f"{type(exc).__name__}: {exc}")
            return "failed"
        return self._succeed(claim, outputs)

    def _claim(self, job_id: str, *, redelivered: bool) -> Claim | str:
        with self.sf() as session:
            job = session.get(Job, job_id, with_for_update=True, options=[noload(Job.outputs)])
            if job is None:
                log.warning("job %s not found; dropping its message", job_id)
                return "missing"
            if JobStatus(job.status) in TERMINAL:
                return f"skipped ({job.status})"
            if job.status == JobStatus.RUNNING and not redelivered:
                # A duplicate publish (the relay re-sent a message it could not stamp) while another
                # worker owns the job: drop it. A redelivery means that owner died: take over.
                return "duplicate"
            if job.attempts >= self.settings.job_max_attempts:
                job.status = JobStatus.FAILED
                job.error_code = "too_many_attempts"
                job.error_message = f"the job was started {job.attempts} times without finishing"
                job.finished_at = utcnow()
                emit(session, job, EventType.FAILED, api_base=self.settings.api_url)
                session.commit()
                return "failed"
            job.status = JobStatus.RUNNING
            job.attempts += 1
            if job.started_at is None:
                job.started_at = utcnow()
                JOB_WAIT.labels(job.family).observe((job.started_at - job.created_at).total_seconds())
            job.progress_step = 0
            job.eta_seconds = None
            emit(session, job, EventType.STARTED, api_base=self.settings.api_url)
            session.commit()
            return Claim(job.id, job.attempts, job.family, job.model, job.task, dict(job.params))

    def _generate(self, claim: Claim) -> list[Image.Image]:
        from inference_server.engine.runner import GenerationRequest, LoraRef

        p = claim.params
        image, mask = self._load_inputs(p)
        width, height = p.get("width"), p.get("height")
        if claim.task == "edit" and image is not None and not (width and height):
            from inference_server import imaging

            width, height = imaging.edit_size(image, max_pixels=self.settings.max_input_pixels)
        seed = int(p["seed"])
        request = GenerationRequest(
            family=claim.family,
            model=claim.model,
            task=claim.task,
            prompt=p.get("prompt", ""),
            negative_prompt=p.get("negative_prompt"),
            width=int(width),  # type: ignore[arg-type]  # set by the service or edit_size above
            height=int(height),  # type: ignore[arg-type]
            steps=int(p["steps"]),
            guidance_scale=p.get("guidance_scale"),
            seeds=[seed + i for i in range(int(p.get("num_images", 1)))],
            strength=p.get("strength"),
            image=image,
            mask=mask,
            loras=[LoraRef(lo["name"], float(lo.get("scale", 1.0))) for lo in p.get("loras", [])],
        )
        if image is not None and claim.task != "edit":
            from inference_server import imaging

            request.image = imaging.fit_input(image, request.width, request.height)
            if mask is not None:
                request.mask = imaging.fit_mask(mask, request.width, request.height)
        with ProgressWatcher(
            self.sf,
            claim.job_id,
            claim.attempt,
            progress_interval=self.settings.progress_interval,
            poll_interval=self.settings.cancel_poll_interval,
            api_base=self.settings.api_url,
        ) as watcher:
            images = self.engine.generate(request, on_step=watcher.on_step)
            if watcher.canceled:
                raise JobCanceled("canceled during the run")
        return images

    def _load_inputs(self, p: dict[str, Any]) -> tuple[Image.Image | None, Image.Image | None]:
        # JPEG inputs decode at reduced scale when they are much larger than the output.
        draft = (int(p["width"]), int(p["height"])) if p.get("width") and p.get("height") else None
        loaded = []
        for name in ("image", "mask"):
            ref = p.get(name)
            loaded.append(self._read_image(ref, draft_size=draft) if ref else None)
        return loaded[0], loaded[1]

    def _read_image(self, ref: str, *, draft_size: tuple[int, int] | None = None) -> Image.Image:
        from inference_server import imaging

        s = self.settings
        data = imaging.resolve_input(
            ref,
            read_storage=self.storage.get,
            allow_private=s.allow_private_networks,
            timeout=s.input_fetch_timeout,
            max_bytes=s.max_input_bytes,
        )
        return imaging.decode_image(
            data, max_bytes=s.max_input_bytes, max_pixels=s.max_input_pixels, draft_size=draft_size
        )

    # -- outputs ---------------------------------------------------------------------------------

    def _store_outputs(self, claim: Claim, images: list[Image.Image]) -> list[JobOutput]:
        from inference_server import imaging

        p = claim.params
        out = p.get("output") or {}
        fmt = out.get("format", "png")
        signature = None
        if p.get("signature"):
            signature = self._read_image(p["signature"]["image"])
        seed = int(p["seed"])

        def finish(index: int, image: Image.Image) -> JobOutput:
            if signature is not None:
                sig = p["signature"]
                image = imaging.composite_signature(
                    image, signature, position=sig["position"], opacity=sig["opacity"], size=sig["size"]
                )
            parameters = {
                "prompt": p.get("prompt", ""),
                "negative_prompt": p.get("negative_prompt"),
                "seed": seed + index,
                "model": claim.model,
                "family": claim.family,
                "task": claim.task,
                "steps": p.get("steps"),
                "guidance_scale": p.get("guidance_scale"),
                "width": image.width,
                "height": image.height,
                "loras": p.get("loras", []),
            }
            data, content_type = imaging.encode_output(
                image,
                fmt=fmt,
                quality=int(out.get("quality", 90)),
                metadata=out.get("metadata", {}),
                parameters=parameters,
            )
            uri = self.storage.put(output_key(claim.job_id, index, EXTENSIONS[fmt]), data, content_type)
            return JobOutput(
                job_id=claim.job_id,
                index=index,
                uri=uri,
                content_type=content_type,
                width=image.width,
                height=image.height,
                seed=seed + index,
                sha256=hashlib.sha256(data).hexdigest(),
                size_bytes=len(data),
            )

        if len(images) == 1:
            return [finish(0, images[0])]
        # Encodes release the GIL in Pillow and uploads wait on the network: overlap them.
        with ThreadPoolExecutor(max_workers=min(4, len(images))) as pool:
            return list(pool.map(finish, range(len(images)), images))

    def _succeed(self, claim: Claim, outputs: list[JobOutput]) -> str:
        with self.sf() as session:
            # Outputs are only ever written here, together with success, so there are none to load
            # or replace: a job whose success is already recorded never reaches this point.
            job = session.get(Job, claim.job_id, with_for_update=True, options=[noload(Job.outputs)])
            if job is None or job.status != JobStatus.RUNNING or job.attempts != claim.attempt:
                return "superseded"  # canceled meanwhile, or a newer attempt owns the job
            now = utcnow()
            job.status = JobStatus.SUCCEEDED
            job.finished_at = job.updated_at = now
            job.eta_seconds = 0.0
            job.progress_step = job.progress_total
            job.outputs = outputs
            emit(session, job, EventType.SUCCEEDED, api_base=self.settings.api_url)
            session.commit()
        return "succeeded"

    def _fail(self, claim: Claim, code: str, message: str) -> None:
        with self.sf() as session:
            now = utcnow()
            result: CursorResult[Any] = session.execute(  # type: ignore[assignment]
                update(Job)
                .where(Job.id == claim.job_id, Job.status == JobStatus.RUNNING, Job.attempts == claim.attempt)
                .values(
                    status=JobStatus.FAILED,
                    finished_at=now,
                    error_code=code,
                    error_message=message[:2000],
                    eta_seconds=None,
                    updated_at=now,
                )
            )
            if result.rowcount == 0:
                session.rollback()
                return
            job = session.get(Job, claim.job_id)
            assert job is not None  # it was just updated in this transaction
            session.refresh(job)
            emit(session, job, EventType.FAILED, api_base=self.settings.api_url)
            session.commit()
