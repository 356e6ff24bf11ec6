"""Running one job: claim it, run the pipeline with progress and cancellation, post-process, upload,
and record outputs and success together. A redelivered job restarts cleanly; success is recorded
at most once because every write is conditional on this attempt still owning a running job."""

from __future__ import annotations

import hashlib
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from PIL import Image
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from inference_server.errors import DependencyDown, InferenceError, InvalidRequest, JobCanceled, StorageError
from inference_server.jobs import transitions
from inference_server.jobs.enums import ClaimRefusal, RunOutcome, Task
from inference_server.jobs.spec import JobSpec
from inference_server.jobs.transitions import Claim
from inference_server.settings import Settings
from inference_server.storage.base import Storage, output_key
from workers.cancels import CancelListener
from workers.metrics import JOB_DURATION, JOB_WAIT, JOBS_FINISHED
from workers.progress import ProgressWatcher

log = logging.getLogger(__name__)

TRANSIENT = (StorageError, DependencyDown)
DATABASE_DOWN = (OperationalError, InterfaceError)  # connection-level: worth a retry
EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}


class RetryLater(Exception):
    """A transient failure: the task should be retried (the job stays running)."""

    def __init__(self, error: InferenceError) -> None:
        super().__init__(error.message)
        self.error = error


class Superseded(JobCanceled):
    """The run was stopped because a newer attempt of the job took it over."""


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
        self._recorder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="claim")
        bind = session_factory.kw.get("bind")
        self._cancels = (
            CancelListener(bind) if bind is not None and bind.dialect.name == "postgresql" else None
        )

    # -- lifecycle -------------------------------------------------------------------------------

    def run(self, job_id: str, *, redelivered: bool) -> RunOutcome:
        """Run ``job_id``; return how the run ended. Raises RetryLater on transient failures."""
        try:
            claimed = self._claim(job_id, redelivered=redelivered)
            if isinstance(claimed, ClaimRefusal):
                log.info("job %s not run: %s", job_id, claimed.value)
                return RunOutcome.NOT_RUN
            claim, recorded = claimed
            started = time.perf_counter()
            outcome = self._run_claimed(claim, recorded)
        except DATABASE_DOWN as exc:
            # The claim or the end could not be recorded: the job is still queued, or running under
            # this attempt, and the retry (a redelivery) runs it again instead of stranding it.
            raise RetryLater(DependencyDown(f"database unavailable: {exc}")) from exc
        JOB_DURATION.labels(claim.family, claim.task).observe(time.perf_counter() - started)
        if outcome.finished_job:
            JOBS_FINISHED.labels(claim.family, outcome.value).inc()
        return outcome

    def _claim(self, job_id: str, *, redelivered: bool) -> tuple[Claim, Future[None]] | ClaimRefusal:
        """Lock and claim the job; its claim is written and committed beside the pipeline's start
        (``recorded``), so the GPU does not wait for that transaction."""
        session = self.sf()
        try:
            claim = transitions.claim(
                session,
                job_id,
                redelivered=redelivered,
                max_attempts=self.settings.job_max_attempts,
            )
        except BaseException:
            session.close()
            raise
        if isinstance(claim, ClaimRefusal):
            session.close()  # releases the lock
            if claim == ClaimRefusal.MISSING:
                log.warning("job %s not found; dropping its message", job_id)
            return claim
        if claim.attempt == 1:
            JOB_WAIT.labels(claim.family).observe(
                (claim.row["started_at"] - claim.row["created_at"]).total_seconds()
            )
        return claim, self._recorder.submit(self._record_claim, session, claim)

    def _record_claim(self, session: Session, claim: Claim) -> None:
        with session:
            transitions.record_claim(session, claim)

    def _run_claimed(self, claim: Claim, recorded: Future[None]) -> RunOutcome:
        # Every end is written after the claim: each path waits for ``recorded``, which re-raises
        # a failed claim write (the job is then retried).
        try:
            images = self._generate(claim, recorded)
            outputs = self._store_outputs(claim, images)
        except Superseded:
            recorded.result()
            return RunOutcome.SUPERSEDED
        except JobCanceled:
            recorded.result()
            return RunOutcome.CANCELED
        except Exception as exc:
            recorded.result()
            return self._failed(claim, exc)
        recorded.result()
        return self._succeed(claim, outputs)

    def _failed(self, claim: Claim, exc: Exception) -> RunOutcome:
        """Retry the job after a transient failure, or record why it failed."""
        if isinstance(exc, DATABASE_DOWN):
            raise exc
        if isinstance(exc, TRANSIENT):
            if claim.attempt < self.settings.job_max_attempts:
                raise RetryLater(exc) from exc
            self._fail(claim, exc.code, exc.message)
        elif isinstance(exc, InferenceError):
            self._fail(claim, exc.code, exc.message)
        else:  # a bug or a runtime error in a model: the job fails with a reason
            log.error("job %s crashed", claim.job_id, exc_info=exc)
            self._fail(claim, "internal_error", f"{type(exc).__name__}: {exc}")
        return RunOutcome.FAILED

    def _generate(self, claim: Claim, recorded: Future[None]) -> list[Image.Image]:
        from inference_server.engine.runner import GenerationRequest, LoraRef

        spec = claim.spec
        image, mask = self._load_inputs(spec)
        width, height = spec.width, spec.height
        if spec.task == Task.EDIT and image is not None and not (width and height):
            from inference_server import imaging

            width, height = imaging.edit_size(image, max_pixels=self.settings.max_input_pixels)
        if width is None or height is None:
            raise InvalidRequest(f"task {spec.task.value!r} needs a width and a height", code="invalid_size")
        request = GenerationRequest(
            family=spec.family,
            model=spec.model,
            task=spec.task.value,
            prompt=spec.prompt,
            negative_prompt=spec.negative_prompt,
            width=width,
            height=height,
            steps=spec.steps,
            guidance_scale=spec.guidance_scale,
            seeds=list(spec.seeds),
            strength=spec.strength,
            image=image,
            mask=mask,
            loras=[LoraRef(lo.name, lo.scale) for lo in spec.loras],
        )
        if image is not None and spec.task != Task.EDIT:
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
            after=recorded,
            cancels=self._cancels,
        ) as watcher:
            try:
                images = self.engine.generate(request, on_step=watcher.on_step)
                if watcher.canceled:
                    raise JobCanceled("canceled during the run")
            except JobCanceled:
                if watcher.superseded:
                    raise Superseded("a newer attempt owns the job") from None
                raise
        return images

    def _load_inputs(self, spec: JobSpec) -> tuple[Image.Image | None, Image.Image | None]:
        # JPEG inputs decode at reduced scale when they are much larger than the output.
        draft = (spec.width, spec.height) if spec.width and spec.height else None
        image = self._read_image(spec.image, draft_size=draft) if spec.image else None
        mask = self._read_image(spec.mask, draft_size=draft) if spec.mask else None
        return image, mask

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

    def _store_outputs(self, claim: Claim, images: list[Image.Image]) -> list[dict[str, Any]]:
        from inference_server import imaging

        spec = claim.spec
        sig = spec.signature
        signature = self._read_image(sig.image) if sig is not None else None

        def finish(index: int, image: Image.Image) -> dict[str, Any]:
            if sig is not None and signature is not None:
                image = imaging.composite_signature(
                    image, signature, position=sig.position, opacity=sig.opacity, size=sig.size
                )
            seed = spec.seeds[index]
            parameters = {
                "prompt": spec.prompt,
                "negative_prompt": spec.negative_prompt,
                "seed": seed,
                "model": spec.model,
                "family": spec.family,
                "task": spec.task.value,
                "steps": spec.steps,
                "guidance_scale": spec.guidance_scale,
                "width": image.width,
                "height": image.height,
                "loras": [lo.model_dump() for lo in spec.loras],
            }
            data, content_type = imaging.encode_output(
                image,
                fmt=spec.output.format,
                quality=spec.output.quality,
                metadata=spec.output.metadata,
                parameters=parameters,
            )
            key = output_key(claim.job_id, index, EXTENSIONS[spec.output.format])
            uri = self.storage.put(key, data, content_type)
            return {
                "job_id": claim.job_id,
                "index": index,
                "uri": uri,
                "content_type": content_type,
                "width": image.width,
                "height": image.height,
                "seed": seed,
                "sha256": hashlib.sha256(data).hexdigest(),
                "size_bytes": len(data),
            }

        if len(images) == 1:
            return [finish(0, images[0])]
        # Encodes release the GIL in Pillow and uploads wait on the network: overlap them.
        with ThreadPoolExecutor(max_workers=min(4, len(images))) as pool:
            return list(pool.map(finish, range(len(images)), images))

    def _succeed(self, claim: Claim, outputs: list[dict[str, Any]]) -> RunOutcome:
        with self.sf() as session:
            if not transitions.succeed(session, claim, outputs):
                return RunOutcome.SUPERSEDED  # canceled meanwhile, or a newer attempt owns the job
        return RunOutcome.SUCCEEDED

    def _fail(self, claim: Claim, code: str, message: str) -> None:
        with self.sf() as session:
            transitions.fail(session, claim, code, message)
