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

from inference_server.errors import DependencyDown, InferenceError, JobCanceled, StorageError
from inference_server.jobs import transitions
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

    def run(self, job_id: str, *, redelivered: bool) -> str:
        """Run ``job_id``; return the outcome (for logs). Raises RetryLater on transient failures."""
        try:
            claimed = self._claim(job_id, redelivered=redelivered)
            if isinstance(claimed, str):
                return claimed
            claim, recorded = claimed
            started = time.perf_counter()
            outcome = self._run_claimed(claim, recorded)
        except DATABASE_DOWN as exc:
            # The claim or the end could not be recorded: the job is still queued, or running under
            # this attempt, and the retry (a redelivery) runs it again instead of stranding it.
            raise RetryLater(DependencyDown(f"database unavailable: {exc}")) from exc
        JOB_DURATION.labels(claim.family, claim.task).observe(time.perf_counter() - started)
        if outcome in ("succeeded", "failed", "canceled"):
            JOBS_FINISHED.labels(claim.family, outcome).inc()
        return outcome

    def _claim(self, job_id: str, *, redelivered: bool) -> tuple[Claim, Future[None]] | str:
        """Lock and claim the job; its claim is written and committed beside the pipeline's start
        (``recorded``), so the GPU does not wait for that transaction."""
        session = self.sf()
        try:
            claim = transitions.claim(
                session,
                job_id,
                redelivered=redelivered,
                max_attempts=self.settings.job_max_attempts,
                api_base=self.settings.api_url,
            )
        except BaseException:
            session.close()
            raise
        if isinstance(claim, str):
            session.close()  # releases the lock
            if claim == "missing":
                log.warning("job %s not found; dropping its message", job_id)
            return claim
        if claim.attempt == 1:
            JOB_WAIT.labels(claim.family).observe(
                (claim.row["started_at"] - claim.row["created_at"]).total_seconds()
            )
        return claim, self._recorder.submit(self._record_claim, session, claim)

    def _record_claim(self, session: Session, claim: Claim) -> None:
        with session:
            transitions.record_claim(session, claim, api_base=self.settings.api_url)

    def _run_claimed(self, claim: Claim, recorded: Future[None]) -> str:
        # Every end is written after the claim: each path waits for ``recorded``, which re-raises
        # a failed claim write (the job is then retried).
        try:
            images = self._generate(claim, recorded)
            outputs = self._store_outputs(claim, images)
        except Superseded:
            recorded.result()
            return "superseded"
        except JobCanceled:
            recorded.result()
            return "canceled"
        except Exception as exc:
            recorded.result()
            return self._failed(claim, exc)
        recorded.result()
        return self._succeed(claim, outputs)

    def _failed(self, claim: Claim, exc: Exception) -> str:
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
            self._fail(claim, "internal_error", f"an internal error occurred ({type(exc).__name__})")
        return "failed"

    def _generate(self, claim: Claim, recorded: Future[None]) -> list[Image.Image]:
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

    def _store_outputs(self, claim: Claim, images: list[Image.Image]) -> list[dict[str, Any]]:
        from inference_server import imaging

        p = claim.params
        out = p.get("output") or {}
        fmt = out.get("format", "png")
        signature = None
        if p.get("signature"):
            signature = self._read_image(p["signature"]["image"])
        seed = int(p["seed"])

        def finish(index: int, image: Image.Image) -> dict[str, Any]:
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
            return {
                "job_id": claim.job_id,
                "index": index,
                "uri": uri,
                "content_type": content_type,
                "width": image.width,
                "height": image.height,
                "seed": seed + index,
                "sha256": hashlib.sha256(data).hexdigest(),
                "size_bytes": len(data),
            }

        if len(images) == 1:
            return [finish(0, images[0])]
        # Encodes release the GIL in Pillow and uploads wait on the network: overlap them.
        with ThreadPoolExecutor(max_workers=min(4, len(images))) as pool:
            return list(pool.map(finish, range(len(images)), images))

    def _succeed(self, claim: Claim, outputs: list[dict[str, Any]]) -> str:
        with self.sf() as session:
            if not transitions.succeed(session, claim, outputs, api_base=self.settings.api_url):
                return "superseded"  # canceled meanwhile, or a newer attempt owns the job
        return "succeeded"

    def _fail(self, claim: Claim, code: str, message: str) -> None:
        with self.sf() as session:
            transitions.fail(session, claim, code, message, api_base=self.settings.api_url)
