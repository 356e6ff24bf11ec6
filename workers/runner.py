"""Running one job: claim it under a lease, run the pipeline with progress, lease renewal and
cancellation, then finish it: post-process, upload, and record outputs and success together. With a
``Finisher`` (workers/finisher.py) the finishing happens on its thread while the next job denoises.

The database decides what runs: the job's message is acknowledged as the run starts, and from then
on the lease carries the job. A run that dies is found by the reconciler once its lease expires; a
transient failure puts the job back in its queue through the outbox; success is recorded at most
once because every write is conditional on this attempt still owning the running job."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from PIL import Image
from sqlalchemy import select
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from inference_server.db import DeletedJob, Job
from inference_server.errors import DependencyDown, InferenceError, InvalidRequest, JobCanceled, StorageError
from inference_server.jobs import transitions
from inference_server.jobs.enums import ClaimRefusal, JobStatus, RunOutcome, Task
from inference_server.jobs.spec import JobSpec
from inference_server.jobs.transitions import Claim
from inference_server.logs import bind_job
from inference_server.publish.topology import default_queue
from inference_server.settings import Settings
from inference_server.storage.base import Storage
from workers.ahead import AheadClaims, Prepared
from workers.batching import Batcher
from workers.cancels import CancelListener
from workers.finisher import FinishedRun, Finisher, run_context
from workers.metrics import BUSY_SECONDS, JOB_DURATION, JOB_WAIT, JOBS_FINISHED, LORA_SWITCH
from workers.outputs import Extras, ToStore, read_image, store_all
from workers.previews import LatestPreview
from workers.progress import ProgressWatcher
from workers.storing import StoringProcess

log = logging.getLogger(__name__)

T = TypeVar("T")
TRANSIENT = (StorageError, DependencyDown)
DATABASE_DOWN = (OperationalError, InterfaceError)  # connection-level: worth a retry


class ClaimUnavailable(Exception):
    """The database could not record the claim: the job is still queued, and its message (already
    acknowledged) must go back to its queue."""


class Superseded(JobCanceled):
    """The run was stopped because a newer attempt of the job took it over, or its lease ran out."""


class JobRunner:
    """Runs jobs in a worker child. Holds the engine (and its pipeline cache) for the child's life.

    ``finish_in_flight``: how many denoised pipeline calls (a job, or a batch's members) may be
    finished (encoded, uploaded, recorded) on a thread of their own while ``run`` returns to take
    the next job; 0 (the default) finishes each job inside ``run``. ``close`` drains them.
    ``ending``: called with a job's id as its run nears its end, or stops early because it is no
    longer wanted (the worker's gate takes the next message then). ``ahead``: claim the
    job of that next message before its task comes (workers/ahead.py). ``storing``: the process
    outputs are stored in (workers/storing.py; None: on the finishing thread)."""

    def __init__(
        self,
        settings: Settings,
        session_factory: sessionmaker[Session],
        storage: Storage,
        engine: Any,
        *,
        worker_name: str | None = None,
        watcher: Any = None,
        finish_in_flight: int = 0,
        ending: Callable[[str], None] | None = None,
        ahead: bool = False,
        storing: StoringProcess | None = None,
    ) -> None:
        self.settings = settings
        # workers.registry_watch.RegistryWatcher: the runtime registry (read again for a job it lacks)
        self.watcher = watcher
        self.sf = session_factory
        self.storage = storage
        self.engine = engine
        self.worker_name = worker_name or socket.gethostname()
        self._recorder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="claim")
        bind = session_factory.kw.get("bind")
        self._cancels = (
            CancelListener(bind) if bind is not None and bind.dialect.name == "postgresql" else None
        )
        self.finisher = Finisher(self.finish, finish_in_flight) if finish_in_flight > 0 else None
        self._storing = storing  # where outputs are stored (None: on the calling thread)
        self._tell_ending = ending
        # Reads the engine's registry at each claim: the runtime registry may change it.
        self._batcher = Batcher(self) if getattr(engine, "registry", None) is not None else None
        # ``ahead``: the next job is claimed while this one's last steps run (its id comes from
        # the gate; child.py feeds it). A claim not taken by its run within a lease is given back.
        self.ahead = None
        if ahead:
            # Within the lease: a batch's members, claimed ahead, have no watcher renewing theirs.
            hold = settings.job_lease_seconds / 2
            self.ahead = AheadClaims(self._prepare_ahead, self._give_back, hold=hold, room=self._room)

    def close(self, timeout: float | None = None) -> bool:
        """Finish every job handed to the finisher (the child is exiting); return whether all were
        recorded within ``timeout``. Those that were not are left to their leases. A job claimed
        ahead and not run is given back."""
        if self.ahead is not None:
            self.ahead.close()
        try:
            return True if self.finisher is None else self.finisher.close(timeout)
        finally:
            if self._storing is not None:
                self._storing.close()
            if self._cancels is not None:
                self._cancels.close()

    # -- lifecycle -------------------------------------------------------------------------------

    def run(self, job_id: str, *, queue: str | None = None) -> RunOutcome | ClaimRefusal:
        """Run ``job_id``, whose message came from ``queue`` (where a transient failure sends it
        back); return how the run ended (``FINISHING``: denoised and handed to the finisher, which
        records the end), or why it did not run. Raises ClaimUnavailable when the database cannot
        take the claim. Blocks while the finisher holds as many calls as it may."""
        if self.watcher is None:
            return self._run(job_id, queue)
        with self.watcher.lock:  # no placement load runs beside a job
            try:
                return self._run(job_id, queue)
            finally:
                try:
                    self.watcher.report()
                except Exception as exc:
                    log.warning("loaded models not reported: %s", type(exc).__name__)

    def _run(self, job_id: str, queue: str | None) -> RunOutcome | ClaimRefusal:
        prepared = self.ahead.take(job_id) if self.ahead is not None else None
        if prepared is not None:
            claim, recorded = prepared.claim, prepared.recorded
        else:
            try:
                claimed = self._claim(job_id)
            except DATABASE_DOWN as exc:
                raise ClaimUnavailable(f"database unavailable: {type(exc).__name__}") from exc
            if isinstance(claimed, ClaimRefusal):
                log.info("job %s not run: %s", job_id, claimed.value)
                return claimed
            claim, recorded = claimed
        self._know(claim)
        bind_job(tenant=str(claim.row["tenant_id"]), family=claim.family, attempt=claim.attempt)
        log.info("job started: %s, attempt %d", claim.task, claim.attempt)
        queue = queue or default_queue(claim.family)
        started = time.perf_counter()
        if prepared is not None:
            members = prepared.members  # gathered ahead
        else:
            members = self._batcher.gather(claim, recorded) if self._batcher is not None else []
        if not members:
            finished = self._run_claimed(claim, recorded, queue, started, prepared=prepared)
            BUSY_SECONDS.inc(time.perf_counter() - started)  # the device time (finishing runs beside)
            return self._hand_off([(claim, finished)], started)[0]
        from workers.batching import run_batch

        batch = [(claim, recorded), *members]
        runs = run_batch(self, batch, queue, started, lead=prepared)
        BUSY_SECONDS.inc(time.perf_counter() - started)  # one call's time, however many jobs shared it
        # Members' claims are written: only the lead's run can be an error (its claim unwritten).
        ran = [(c, run) for (c, _), run in zip(batch, runs, strict=True) if not isinstance(run, Exception)]
        outcomes = self._hand_off(ran, started)
        if isinstance(runs[0], Exception):
            raise runs[0]
        return outcomes[0]

    def _room(self) -> bool:
        """Whether the job denoising now can be handed to the finisher at once."""
        return self.finisher is None or self.finisher.held < self.finisher.limit

    def _prepare_ahead(self, job_id: str, queue: str) -> Prepared | None:
        """Claim ``job_id`` ahead of its run (workers/ahead.py, on its thread): written and
        committed, inputs read, watcher started; None when it is not to run."""
        claimed = self._claim(job_id)
        if isinstance(claimed, ClaimRefusal):
            return None  # its run, when its task comes, claims again and says why
        claim, recorded = claimed
        recorded.result()  # a claim not written is not prepared: the run claims afresh
        previews, watcher = self._start_watching(claim, recorded)
        prepared = Prepared(claim, recorded, watcher, queue or default_queue(claim.family), previews=previews)
        try:
            prepared.request = self._request(claim)
        except Exception as exc:  # the run fails the job with it, as if it had read them itself
            prepared.error = exc
            return prepared
        if self._batcher is not None:  # its batch too, waiting for members while the device works
            prepared.members = self._batcher.gather(claim, recorded)
        return prepared

    def _give_back(self, prepared: Prepared) -> None:
        """Queue again a job claimed ahead whose run will not happen here, and the members of its
        batch (their attempts uncounted)."""
        prepared.watcher.stop()
        with self.sf() as session:
            for claim in [prepared.claim, *(member for member, _ in prepared.members)]:
                transitions.release(session, claim, queue=prepared.queue, delay=0.0, uncount=True)

    def _know(self, claim: Claim) -> None:
        """Read the runtime registry again when the engine does not know the job's model or one of
        its LoRAs: they were added a moment ago, through any API process. Otherwise the watcher's
        poll keeps the registry current, and the job's path holds no registry read."""
        watcher = self.watcher
        if watcher is None:
            return
        loras = [lo.name for lo in claim.spec.loras]
        if watcher.knows(claim.family, claim.spec.model, loras):
            return
        try:
            watcher.sync()
        except Exception as exc:  # the engine then says what it does not know
            log.warning("runtime registry not read for job %s: %s", claim.job_id, type(exc).__name__)

    def _hand_off(
        self, runs: list[tuple[Claim, RunOutcome | FinishedRun]], started: float
    ) -> list[RunOutcome]:
        """Finish the denoised runs of one call here or in the finisher (``FINISHING``), and
        count how the others ended; return each one's outcome, in order."""
        finished = [run for _, run in runs if isinstance(run, FinishedRun)]
        outcomes = [
            _observed(claim, started, run) if isinstance(run, RunOutcome) else RunOutcome.FINISHING
            for claim, run in runs
        ]
        if not finished:
            return outcomes
        took = time.perf_counter() - started
        if self.finisher is None:
            log.info("%s: denoised; finishing here (%.3f s from the claim)", _jobs(finished), took)
            done = iter(self.finish(finished))
            return [next(done) if o is RunOutcome.FINISHING else o for o in outcomes]
        try:
            held = self.finisher.submit(finished)
        except BaseException:
            for run in finished:
                run.watcher.stop()  # left to its lease, which the reconciler finds
            raise
        for run in finished:
            log.info(
                "job %s: denoised; %d of %d in the finisher (%.3f s from its claim)",
                run.claim.job_id,
                held,
                self.finisher.limit,
                took,
            )
        return outcomes

    def _claim(self, job_id: str) -> tuple[Claim, Future[None]] | ClaimRefusal:
        """Lock and claim the job; its claim is written and committed beside the pipeline's start
        (``recorded``), so the GPU does not wait for that transaction."""
        session = self.sf()
        try:
            claim = transitions.claim(
                session,
                job_id,
                max_attempts=self.settings.job_max_attempts,
                lease_seconds=self.settings.job_lease_seconds,
                worker=self.worker_name,
            )
        except BaseException:
            session.close()
            raise
        if isinstance(claim, ClaimRefusal):
            session.close()  # releases the lock
            return claim
        if claim.attempt == 1:
            JOB_WAIT.labels(claim.family).observe(
                (claim.row["started_at"] - claim.row["created_at"]).total_seconds()
            )
        return claim, self._recorder.submit(self._record_claim, session, claim)

    def _record_claim(self, session: Session, claim: Claim) -> None:
        with session:
            transitions.record_claim(session, claim)

    def _run_claimed(
        self,
        claim: Claim,
        recorded: Future[None],
        queue: str,
        started: float,
        produce: Callable[[], tuple[list[Image.Image], ProgressWatcher]] | None = None,
        *,
        prepared: Prepared | None = None,
    ) -> RunOutcome | FinishedRun:
        """Denoise the job (or take its share of a batch from ``produce``), ready to finish, or
        its end if it ended there."""
        # Every end is written after the claim: each path waits for ``recorded`` first, and a job
        # goes to the finisher only once its claim is committed.
        extras = Extras()
        try:
            if produce is not None:
                images, watcher = produce()
            else:
                images, watcher, extras = self._generate(claim, recorded, prepared)
        except Superseded:
            self._claim_written(recorded)
            return RunOutcome.SUPERSEDED
        except JobCanceled:
            self._claim_written(recorded)
            return RunOutcome.CANCELED
        except Exception as exc:
            self._claim_written(recorded)
            return self._failed(claim, exc, queue)
        try:
            self._claim_written(recorded)
        except BaseException:
            watcher.stop()
            raise
        if claim.spec.safety != "off":
            try:  # on the device, before the next job: the checker is a model like the pipeline
                extras.verdicts = self.engine.verdicts(claim.family, images)
            except Exception as exc:
                watcher.stop()
                return self._failed(claim, exc, queue)
        return FinishedRun(claim, images, watcher.total, queue, watcher, started, extras=extras)

    def finish(self, runs: list[FinishedRun]) -> list[RunOutcome]:
        """Encode, sign and upload the images of one call's denoised jobs (a job, or a batch's
        members, all at once), then record their successes in one transaction, or release or fail
        a job whose storing failed; each run's watcher is stopped just before the ends are written.
        A job canceled or taken over meanwhile is not recorded (and not uploaded, if that was known
        before the upload). Returns each run's outcome, in order. The finisher's thread calls this,
        or ``run`` does without one."""
        for run in runs:
            _check_steps(run)
        wanted = [run for run in runs if not run.watcher.canceled]
        stored: dict[str, list[dict[str, Any]] | Exception] = {}
        try:
            stored = dict(zip([r.claim.job_id for r in wanted], self._store_all(wanted), strict=True))
        except Exception as exc:  # the storing process stopped: every job of the call is hit
            stored = {r.claim.job_id: exc for r in wanted}
        finally:
            for run in runs:  # their last lease renewals and progress writes are in before the ends
                run.watcher.stop(wait=False)
            for run in runs:
                run.watcher.stop()
        outcomes: dict[str, RunOutcome] = {}
        succeeded: list[tuple[FinishedRun, list[dict[str, Any]]]] = []
        for run in runs:
            claim, watcher, result = run.claim, run.watcher, stored.get(run.claim.job_id, [])
            if watcher.superseded:
                outcomes[claim.job_id] = RunOutcome.SUPERSEDED
            elif watcher.canceled:
                outcomes[claim.job_id] = RunOutcome.CANCELED
            elif isinstance(result, Exception):
                with run_context(run):
                    outcomes[claim.job_id] = self._failed(claim, result, run.queue)
            else:
                succeeded.append((run, result))
        if succeeded:
            ends = [(run.claim, rows, run.steps) for run, rows in succeeded]
            owned = self._ending(
                lambda session: transitions.succeed_all(session, ends), *(c for c, _, _ in ends)
            )
            for i, (run, rows) in enumerate(succeeded):
                mine = None if owned is None else owned[i]
                if mine is False:
                    self._drop_if_deleted(run.claim, rows)
                    outcomes[run.claim.job_id] = self._refused(run.claim)
                else:
                    outcomes[run.claim.job_id] = _outcome(mine, RunOutcome.SUCCEEDED)
        return [_observed(run.claim, run.started, outcomes[run.claim.job_id]) for run in runs]

    def _store_all(self, runs: list[FinishedRun]) -> list[list[dict[str, Any]] | Exception]:
        jobs = [ToStore(r.claim.job_id, r.claim.spec, r.images, r.extras) for r in runs]
        if not jobs:
            return []
        if self._storing is not None:
            return self._storing.store_all(jobs)
        return store_all(self.settings, self.storage, jobs)

    def _refused(self, claim: Claim) -> RunOutcome:
        """Why the success of a run was not recorded: the job was canceled while its outputs
        were stored (its watcher had not seen it yet), or a newer attempt owns it."""
        try:
            with self.sf() as session:
                status = session.scalar(select(Job.status).where(Job.id == claim.job_id))
        except DATABASE_DOWN:
            status = None
        return RunOutcome.CANCELED if status == JobStatus.CANCELED else RunOutcome.SUPERSEDED

    def _drop_if_deleted(self, claim: Claim, outputs: list[dict[str, Any]]) -> None:
        """The job was deleted (``DELETE /v1/jobs/{id}``) while this attempt stored its outputs: no
        row will ever list them, so they go now. (Any other refusal leaves them: a newer attempt of
        the same job writes the same keys.)"""
        try:
            with self.sf() as session:
                if session.get(DeletedJob, claim.job_id) is None:
                    return
            self.storage.delete([o["uri"] for o in outputs if o["uri"]])
            log.info("job %s was deleted while it ran: its %d outputs removed", claim.job_id, len(outputs))
        except Exception as exc:  # noqa: BLE001 - a leftover object must not fail the worker
            log.warning("job %s was deleted; its outputs could not be removed: %s", claim.job_id, exc)

    @staticmethod
    def _claim_written(recorded: Future[None]) -> None:
        try:
            recorded.result()
        except DATABASE_DOWN as exc:
            raise ClaimUnavailable(f"database unavailable: {type(exc).__name__}") from exc

    def _failed(self, claim: Claim, exc: Exception, queue: str) -> RunOutcome:
        """Queue the job again after a transient failure, or record why it failed."""
        if isinstance(exc, (*TRANSIENT, *DATABASE_DOWN)):
            error = exc if isinstance(exc, InferenceError) else DependencyDown("the database is unavailable")
            if claim.attempt < self.settings.job_max_attempts:
                return self._release(claim, error, queue)
            code, message = error.code, error.message
        elif isinstance(exc, InferenceError):
            code, message = exc.code, exc.message
        else:  # a bug or a runtime error in a model: the job fails with a reason
            log.error("job %s crashed", claim.job_id, exc_info=exc)
            code, message = "internal_error", f"an internal error occurred ({type(exc).__name__})"
        owned = self._ending(lambda session: transitions.fail(session, claim, code, message), claim)
        return _outcome(owned, RunOutcome.FAILED)

    def _release(self, claim: Claim, error: InferenceError, queue: str) -> RunOutcome:
        delays = self.settings.job_retry_delays or [5.0]
        delay = delays[min(claim.attempt, len(delays)) - 1]
        log.warning("job %s: %s (%s); queued again in %.0f s", claim.job_id, error.code, error.message, delay)
        owned = self._ending(
            lambda session: transitions.release(session, claim, queue=queue, delay=delay), claim
        )
        return _outcome(owned, RunOutcome.REQUEUED)

    def _ending(self, write: Callable[[Session], T], *claims: Claim) -> T | None:
        """Record the end of ``claims`` with ``write``, retrying while the database is down. Return
        what ``write`` returned (whether this attempt still owned the job), or None when the
        database stayed down past ``JOB_END_RETRY_SECONDS``: the jobs are then left to their
        leases, which the reconciler finds."""
        deadline = time.monotonic() + self.settings.job_end_retry_seconds
        pause = 0.5
        while True:
            try:
                with self.sf() as session:
                    return write(session)
            except DATABASE_DOWN as exc:
                if time.monotonic() + pause > deadline:
                    ids = ", ".join(c.job_id for c in claims)
                    log.error("job %s: end not recorded (%s); left to the reconciler", ids, exc)
                    return None
                time.sleep(pause)
                pause = min(pause * 2, 5.0)

    def _generate(
        self, claim: Claim, recorded: Future[None], prepared: Prepared | None = None
    ) -> tuple[list[Image.Image], ProgressWatcher, Extras]:
        """The job's images, its watcher, still running (it holds the job's lease until the job's
        end is written; the engine's step count is its ``total``), and the control images and
        mask the job asked to get back. ``prepared``: request and watcher made ahead."""
        if prepared is not None:
            request, previews, watcher = prepared.engine_request(), prepared.previews, prepared.watcher
        else:
            request = self._request(claim)
            previews, watcher = self._start_watching(claim, recorded)
        on_step = self._step_callback(watcher, claim)
        extra = {"on_preview": previews.offer} if previews else {}
        extras = Extras()

        def run() -> list[Image.Image]:
            if claim.spec.composed:  # a mask to find, control images to make: under the lease
                made = self.engine.prepare(request)
                spec = claim.spec
                extras.controls = made.controls if spec.return_control else []
                extras.mask = (made.mask or request.mask) if spec.return_mask else None
            elif claim.spec.return_mask:
                extras.mask = request.mask
            return self.engine.generate(request, on_step=on_step, **extra)

        images = self._watched(watcher, run)
        watcher.flush_preview()  # the last one, before the finisher records the end
        self._observe_lora_switch(claim)
        return images, watcher, extras

    def _observe_lora_switch(self, claim: Claim) -> None:
        switch = getattr(self.engine, "last_lora_seconds", None)
        if switch is not None:
            LORA_SWITCH.labels(claim.family).observe(switch)

    def _watcher(
        self,
        claim: Claim,
        recorded: Future[None],
        *,
        previews: LatestPreview | None = None,
    ) -> ProgressWatcher:
        """The side thread of ``claim``'s run (not started): lease, progress, cancellation (pushed
        by the child's one cancel listener, which serves every watcher; polled without one)."""
        return ProgressWatcher(
            self.sf,
            claim.job_id,
            claim.attempt,
            progress_interval=self.settings.progress_interval,
            poll_interval=self.settings.cancel_poll_interval,
            lease_seconds=self.settings.job_lease_seconds,
            after=recorded,
            cancels=self._cancels,
            previews=previews,
        )

    def _start_watching(
        self, claim: Claim, recorded: Future[None]
    ) -> tuple[LatestPreview | None, ProgressWatcher]:
        """A single job's run's previews (when it asked for them) and its watcher, started."""
        previews = LatestPreview(self.storage, claim.job_id) if claim.spec.preview else None
        return previews, self._watcher(claim, recorded, previews=previews).start()

    def _step_callback(
        self, watcher: ProgressWatcher, holder: Claim, *, alone: bool = True
    ) -> Callable[[int, int], bool]:
        """``watcher``'s step callback; with a finisher, it also tells the gate as the run nears its
        end, so the next message (the job ``holder``'s delivery paused it) is on its way: as the last
        step begins, or earlier by as long as a claim ahead has been taking (workers/ahead.py). A
        run ``alone`` also tells it as soon as its watcher finds it canceled or taken over, since it
        stops at its next step (a batch's canceled member leaves the batch, whose call goes on)."""
        tell = self._tell_ending
        if tell is None or self.finisher is None:
            return watcher.on_step
        ahead = self.ahead
        told = False  # once: near the end, or when the run is no longer wanted ...
        lock = threading.Lock()  # ... whichever comes first, on the step or the watcher thread

        # Not while the finisher is full: the hand-off will wait, and so must the next message.
        def ending() -> bool:
            nonlocal told
            with lock:
                if told:
                    return True
                if not self._room():
                    return False
                if ahead is not None:
                    ahead.told()
                told = True
            tell(holder.job_id)
            return True

        if alone:
            watcher.when_unwanted(ending)
        return _telling_near_end(watcher.on_step, ending, ahead.lead if ahead is not None else 0.0)

    @staticmethod
    def _watched(
        watcher: ProgressWatcher, call: Callable[[], list[Image.Image]], *, announce: bool = True
    ) -> list[Image.Image]:
        """``call``'s images, unless the run was canceled or superseded meanwhile (raised, the
        watcher stopped). The watcher keeps running otherwise (``announce``: see its ``denoised``)."""
        try:
            images = call()
            if watcher.canceled:
                raise JobCanceled("canceled during the run")
        except JobCanceled:
            watcher.stop()
            if watcher.superseded:
                raise Superseded("a newer attempt owns the job") from None
            raise
        except BaseException:
            watcher.stop()
            raise
        # Its run is over: a cancel from now on spares the upload, and the gate hears of it no more.
        watcher.when_unwanted(None)
        watcher.denoised(announce=announce)  # its last step written now (the slot is free)
        return images

    def _request(self, claim: Claim) -> Any:
        """The engine's request for ``claim``: inputs read, decoded and fitted to the output size."""
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
            preview_every=spec.preview.every_steps if spec.preview else 0,
            mask_prompt=spec.mask_prompt,
            mask_grow=spec.mask_grow,
            mask_blur=spec.mask_blur,
            mask_threshold=spec.mask_threshold,
        )
        if image is not None and spec.task != Task.EDIT:
            from inference_server import imaging

            request.image = imaging.fit_input(image, request.width, request.height)
            if mask is not None:
                request.mask = imaging.fit_mask(mask, request.width, request.height)
        self._compose_inputs(spec, request, image)
        return request

    def _compose_inputs(self, spec: JobSpec, request: Any, image: Image.Image | None) -> None:
        """The ControlNets' source images (their own, else the job's input) and the reference
        image, decoded: the engine preprocesses them to the output size."""
        from inference_server.engine.compose import ControlRef, IpAdapterRef

        draft = (request.width, request.height)
        for control in spec.controlnets:
            source = self._read_image(control.image, draft_size=draft) if control.image else image
            if source is None:  # the API refuses this; a job stored before that rule still fails clearly
                raise InvalidRequest(
                    f"ControlNet {control.name!r} has no image", code="missing_control_image"
                )
            request.controls.append(
                ControlRef(
                    name=control.name,
                    image=source.convert("RGB"),
                    scale=control.scale,
                    preprocess=control.preprocess or "none",
                    start=control.start,
                    end=control.end,
                )
            )
        if spec.ip_adapter is not None:
            reference = self._read_image(spec.ip_adapter.image)
            request.ip_adapter = IpAdapterRef(
                spec.ip_adapter.name, reference.convert("RGB"), spec.ip_adapter.scale
            )

    def _load_inputs(self, spec: JobSpec) -> tuple[Image.Image | None, Image.Image | None]:
        # JPEG inputs decode at reduced scale when they are much larger than the output.
        draft = (spec.width, spec.height) if spec.width and spec.height else None
        image = self._read_image(spec.image, draft_size=draft) if spec.image else None
        mask = self._read_image(spec.mask, draft_size=draft) if spec.mask else None
        return image, mask

    def _read_image(self, ref: str, *, draft_size: tuple[int, int] | None = None) -> Image.Image:
        return read_image(self.settings, self.storage, ref, draft_size=draft_size)


def _telling_near_end(
    on_step: Callable[[int, int], bool], ending: Callable[[], bool], lead: float
) -> Callable[[int, int], bool]:
    """``on_step`` that also calls ``ending`` once the steps left should take at most ``lead``
    seconds (at the pace of the steps so far), and at the latest as the last step begins; until
    ``ending`` says it told, it is called again at each step."""
    told = False
    began = time.monotonic()
    first = 0.0  # when the first step ended: later steps are timed from there (the first one
    # also holds the prompt's encoding)

    def step(done: int, total: int) -> bool:
        nonlocal told, first
        if not told and 0 < done < total:
            now = time.monotonic()
            if done == 1:
                first = now
            pace = (now - first) / (done - 1) if done > 1 else now - began
            if done == total - 1 or (total - done) * pace <= lead:
                told = ending()
        return on_step(done, total)

    return step


def _check_steps(run: FinishedRun) -> None:
    planned = run.claim.row.get("progress_total")
    if run.steps and planned and run.steps != planned:
        log.warning(
            "job %s ran %d steps where %d were planned: check the registry's strength_steps for %s",
            run.claim.job_id,
            run.steps,
            planned,
            run.claim.family,
        )


def _jobs(runs: list[FinishedRun]) -> str:
    return ("job " if len(runs) == 1 else "jobs ") + ", ".join(r.claim.job_id for r in runs)


def _observed(claim: Claim, started: float, outcome: RunOutcome) -> RunOutcome:
    JOB_DURATION.labels(claim.family, claim.task).observe(time.perf_counter() - started)
    if outcome.finished_job:
        JOBS_FINISHED.labels(claim.family, outcome.value).inc()
    return outcome


def _outcome(owned: bool | None, done: RunOutcome) -> RunOutcome:
    if owned is None:
        return RunOutcome.ABANDONED
    return done if owned else RunOutcome.SUPERSEDED
